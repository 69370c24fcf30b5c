//! Reading an ONNX file far enough to know what it is: its inputs and outputs, and every node's
//! operator (subgraphs included). Backends use this to refuse a model at load time with the
//! operator's name; `outpost inspect` prints it. The decoder is a subset of `onnx.proto`: prost
//! skips every field not declared here, so large weights are never copied.

use std::path::{Path, PathBuf};

use prost::Message;

use crate::tensor::DataType;

/// Largest model file `outpost` will read (the sample models are a few KiB to 200 KiB).
pub const MAX_MODEL_BYTES: u64 = 1 << 30;

/// One input or output of a model, as V2 metadata shows it: dynamic dimensions are -1.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

impl TensorSpec {
    /// Whether `shape` fits this spec: same rank, fixed dimensions equal.
    pub fn accepts_shape(&self, shape: &[usize]) -> bool {
        shape.len() == self.shape.len()
            && self.shape.iter().zip(shape).all(|(&want, &got)| want < 0 || want as usize == got)
    }

    /// The shape as V2 metadata and error messages write it, e.g. `[-1, 64]`.
    pub fn shape_text(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        format!("[{}]", dims.join(", "))
    }
}

/// A model's inputs and outputs.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// A parsed ONNX model: its bytes, signature and nodes.
#[derive(Clone, Debug)]
pub struct ModelGraph {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    pub signature: Signature,
    pub nodes: Vec<Node>,
    /// Opset of the default domain.
    pub opset: i64,
}

/// One node of the graph (or of a subgraph).
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    pub domain: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// Why a file is not a model this runtime can read.
#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {size} bytes is larger than the {max} bytes a model may have")]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("{path}: not an ONNX model ({reason})")]
    Invalid { path: PathBuf, reason: String },
}

impl ModelGraph {
    /// Reads and decodes a model file.
    pub fn read(path: &Path) -> Result<ModelGraph, ModelFileError> {
        let io = |source| ModelFileError::Io { path: path.to_owned(), source };
        let size = std::fs::metadata(path).map_err(io)?.len();
        if size > MAX_MODEL_BYTES {
            return Err(ModelFileError::TooLarge { path: path.to_owned(), size, max: MAX_MODEL_BYTES });
        }
        let bytes = std::fs::read(path).map_err(io)?;
        ModelGraph::from_bytes(path, bytes)
    }

    /// Decodes a model held in memory; `path` names it in errors.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<ModelGraph, ModelFileError> {
        let invalid = |reason: String| ModelFileError::Invalid { path: path.to_owned(), reason };
        let model = pb::Model::decode(bytes.as_slice()).map_err(|e| invalid(e.to_string()))?;
        let graph = model.graph.as_ref().ok_or_else(|| invalid("it has no graph".into()))?;
        if graph.node.is_empty() {
            return Err(invalid("its graph has no nodes".into()));
        }
        let initializers: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let spec = |v: &pb::ValueInfo| tensor_spec(v).map_err(|e| invalid(format!("`{}`: {e}", v.name)));
        let inputs = graph
            .input
            .iter()
            .filter(|v| !initializers.contains(&v.name.as_str()))
            .map(spec)
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = graph.output.iter().map(spec).collect::<Result<Vec<_>, _>>()?;
        if inputs.is_empty() || outputs.is_empty() {
            return Err(invalid("its graph declares no inputs or no outputs".into()));
        }
        let mut nodes = Vec::new();
        collect_nodes(graph, &mut nodes);
        let opset =
            model.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map_or(0, |o| o.version);
        Ok(ModelGraph { path: path.to_owned(), bytes, signature: Signature { inputs, outputs }, nodes, opset })
    }

    /// The distinct operators, sorted, with their domain when it is not the default.
    pub fn operators(&self) -> Vec<String> {
        let mut ops: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                if n.domain.is_empty() || n.domain == "ai.onnx" {
                    n.op_type.clone()
                } else {
                    format!("{}:{}", n.domain, n.op_type)
                }
            })
            .collect();
        ops.sort();
        ops.dedup();
        ops
    }

    /// The nodes that read `tensor`.
    pub fn consumers<'a>(&'a self, tensor: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.nodes.iter().filter(move |n| n.inputs.iter().any(|i| i == tensor))
    }
}

fn collect_nodes(graph: &pb::Graph, out: &mut Vec<Node>) {
    for n in &graph.node {
        out.push(Node {
            name: n.name.clone(),
            op_type: n.op_type.clone(),
            domain: n.domain.clone(),
            inputs: n.input.clone(),
            outputs: n.output.clone(),
        });
        for attr in &n.attribute {
            if let Some(g) = &attr.g {
                collect_nodes(g, out);
            }
            for g in &attr.graphs {
                collect_nodes(g, out);
            }
        }
    }
}

fn tensor_spec(v: &pb::ValueInfo) -> Result<TensorSpec, String> {
    let tensor =
        v.r#type.as_ref().and_then(|t| t.tensor_type.as_ref()).ok_or("only tensor inputs and outputs are supported")?;
    let datatype =
        onnx_datatype(tensor.elem_type).ok_or_else(|| format!("element type {} is not supported", tensor.elem_type))?;
    let shape = match &tensor.shape {
        Some(s) => s.dim.iter().map(|d| d.dim_value.filter(|&v| v > 0).unwrap_or(-1)).collect(),
        None => return Err("its shape is not declared".into()),
    };
    Ok(TensorSpec { name: v.name.clone(), datatype, shape })
}

/// The V2 datatype of an ONNX `TensorProto.DataType`.
pub fn onnx_datatype(elem_type: i32) -> Option<DataType> {
    Some(match elem_type {
        1 => DataType::Fp32,
        2 => DataType::Uint8,
        3 => DataType::Int8,
        4 => DataType::Uint16,
        5 => DataType::Int16,
        6 => DataType::Int32,
        7 => DataType::Int64,
        8 => DataType::Bytes,
        9 => DataType::Bool,
        10 => DataType::Fp16,
        11 => DataType::Fp64,
        12 => DataType::Uint32,
        13 => DataType::Uint64,
        _ => return None,
    })
}

/// The subset of `onnx.proto` (field numbers from the ONNX specification) this module reads,
/// and the tract backend's rewrite writes.
pub(crate) mod pb {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Model {
        #[prost(message, optional, tag = "7")]
        pub graph: Option<Graph>,
        #[prost(message, repeated, tag = "8")]
        pub opset_import: Vec<OpsetId>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OpsetId {
        #[prost(string, tag = "1")]
        pub domain: String,
        #[prost(int64, tag = "2")]
        pub version: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Graph {
        #[prost(message, repeated, tag = "1")]
        pub node: Vec<Node>,
        #[prost(message, repeated, tag = "5")]
        pub initializer: Vec<Initializer>,
        #[prost(message, repeated, tag = "11")]
        pub input: Vec<ValueInfo>,
        #[prost(message, repeated, tag = "12")]
        pub output: Vec<ValueInfo>,
    }

    /// A `TensorProto`, of which only the dimensions and name are read (the weights are skipped).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Initializer {
        #[prost(int64, repeated, tag = "1")]
        pub dims: Vec<i64>,
        #[prost(string, tag = "8")]
        pub name: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Node {
        #[prost(string, repeated, tag = "1")]
        pub input: Vec<String>,
        #[prost(string, repeated, tag = "2")]
        pub output: Vec<String>,
        #[prost(string, tag = "3")]
        pub name: String,
        #[prost(string, tag = "4")]
        pub op_type: String,
        #[prost(message, repeated, tag = "5")]
        pub attribute: Vec<Attribute>,
        #[prost(string, tag = "7")]
        pub domain: String,
    }

    /// An attribute: its name, an integer value, and the subgraphs of control-flow operators.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Attribute {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(int64, tag = "3")]
        pub i: i64,
        #[prost(message, optional, boxed, tag = "6")]
        pub g: Option<Box<Graph>>,
        #[prost(message, repeated, tag = "11")]
        pub graphs: Vec<Graph>,
        #[prost(int32, tag = "20")]
        pub r#type: i32,
    }

    /// `AttributeProto.AttributeType` INT.
    pub const ATTRIBUTE_INT: i32 = 2;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueInfo {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "2")]
        pub r#type: Option<Type>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Type {
        #[prost(message, optional, tag = "1")]
        pub tensor_type: Option<TensorType>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorType {
        #[prost(int32, tag = "1")]
        pub elem_type: i32,
        #[prost(message, optional, tag = "2")]
        pub shape: Option<Shape>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Shape {
        #[prost(message, repeated, tag = "1")]
        pub dim: Vec<Dim>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dim {
        #[prost(int64, optional, tag = "1")]
        pub dim_value: Option<i64>,
        #[prost(string, optional, tag = "2")]
        pub dim_param: Option<String>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models").join(name)
    }

    #[test]
    fn reads_the_edge_model_signature() {
        let g = ModelGraph::read(&sample("digits-edge.onnx")).unwrap();
        let input = &g.signature.inputs[0];
        assert_eq!((input.name.as_str(), input.datatype, input.shape.clone()), ("input", DataType::Fp32, vec![-1, 64]));
        let output = &g.signature.outputs[0];
        assert_eq!((output.name.as_str(), output.shape.clone()), ("probabilities", vec![-1, 10]));
        assert!(g.operators().contains(&"QuantizeLinear".to_string()));
        assert_eq!(g.opset, 17);
    }

    #[test]
    fn garbage_is_not_a_model() {
        for bytes in [b"not a model".to_vec(), vec![], vec![0xff; 64]] {
            let err = ModelGraph::from_bytes(Path::new("x.onnx"), bytes).unwrap_err();
            assert!(err.to_string().starts_with("x.onnx: not an ONNX model"), "{err}");
        }
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let err = ModelGraph::read(Path::new("/nonexistent/m.onnx")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/m.onnx"), "{err}");
    }
}
