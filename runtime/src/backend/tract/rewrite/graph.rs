//! What the rewrite reads of a model's main graph: its nodes, and what is known of the values
//! they read (which are constants, which are scalars).

use std::collections::{HashMap, HashSet};

use prost::Message;

use crate::backend::tract::rewrite::wire::fields;
use crate::onnx::pb;

/// ModelProto.graph, GraphProto.node and GraphProto.initializer.
pub(crate) const MODEL_GRAPH: u32 = 7;
pub(crate) const GRAPH_NODE: u32 = 1;
pub(crate) const GRAPH_INITIALIZER: u32 = 5;
/// GraphProto.output.
const GRAPH_OUTPUT: u32 = 12;
/// TensorProto.DataType FLOAT.
pub(crate) const FLOAT: i64 = 1;

/// The main graph's nodes, and what is known of the values they read.
pub(crate) struct Graph {
    pub nodes: Vec<pb::Node>,
    /// Initializers' dimensions, by name.
    pub constants: HashMap<String, Vec<i64>>,
    /// Values known to be scalars: one-element initializers, DynamicQuantizeLinear's scale and
    /// zero point.
    pub scalars: HashSet<String>,
    /// The graph's outputs, by name.
    pub outputs: HashSet<String>,
    /// Whether a node has a graph attribute (If, Loop, Scan): such a subgraph may read any value
    /// of the main graph by name.
    pub subgraphs: bool,
}

impl Graph {
    pub fn read(model: &[u8]) -> Result<Graph, String> {
        let payload = fields(model)?.into_iter().find(|f| f.tag == MODEL_GRAPH).map(|f| f.payload);
        let payload = payload.ok_or("the model has no graph")?;
        let mut graph = Graph {
            nodes: Vec::new(),
            constants: HashMap::new(),
            scalars: HashSet::new(),
            outputs: HashSet::new(),
            subgraphs: false,
        };
        for field in fields(payload)? {
            match field.tag {
                GRAPH_NODE => graph.nodes.push(pb::Node::decode(field.payload).map_err(|e| e.to_string())?),
                GRAPH_INITIALIZER => {
                    let t = pb::Initializer::decode(field.payload).map_err(|e| e.to_string())?;
                    if t.dims.iter().product::<i64>() == 1 {
                        graph.scalars.insert(t.name.clone());
                    }
                    graph.constants.insert(t.name, t.dims);
                }
                GRAPH_OUTPUT => {
                    graph.outputs.insert(pb::ValueInfo::decode(field.payload).map_err(|e| e.to_string())?.name);
                }
                _ => {}
            }
        }
        graph.subgraphs = graph.nodes.iter().flat_map(|n| &n.attribute).any(|a| a.g.is_some() || !a.graphs.is_empty());
        for node in graph.nodes.iter().filter(|n| is_dynamic_quantize(n)) {
            graph.scalars.extend(node.output.iter().skip(1).cloned());
        }
        Ok(graph)
    }

    pub fn producer(&self, value: &str) -> Option<&pb::Node> {
        self.nodes.iter().find(|n| n.output.iter().any(|o| o == value))
    }

    pub fn is_scalar(&self, value: Option<&str>) -> bool {
        value.is_none_or(|v| self.scalars.contains(v))
    }

    /// The `DynamicQuantizeLinear` nodes (by their quantized output `y`) that can give the
    /// products in `products` (rewritten integer products, by output) their centred first operand
    /// directly (see [`Graph::centres_for`]).
    pub fn centred_quantizers(&self, products: &HashSet<&str>) -> Vec<String> {
        let quantizers = self.nodes.iter().filter(|n| is_dynamic_quantize(n));
        quantizers.filter(|q| self.centres_for(q, products)).map(|q| q.output[0].clone()).collect()
    }

    /// Whether `quantizer`'s output `y` is read only by products in `products` (by output), each
    /// reading `y` as its first operand only, with this quantizer's zero point, and nothing else
    /// can read `y`: it is not a graph output, and the model has no subgraph that could name it.
    pub fn centres_for(&self, quantizer: &pb::Node, products: &HashSet<&str>) -> bool {
        if !is_dynamic_quantize(quantizer) || self.subgraphs || self.outputs.contains(&quantizer.output[0]) {
            return false;
        }
        let (y, zero) = (quantizer.output[0].as_str(), quantizer.output[2].as_str());
        let mut readers = self.nodes.iter().filter(|n| n.input.iter().any(|i| i == y)).peekable();
        readers.peek().is_some()
            && readers.all(|r| {
                r.output.first().is_some_and(|o| products.contains(o.as_str()))
                    && r.input[0] == y
                    && r.input[1] != y
                    && input(r, 2) == Some(zero)
            })
    }

    /// How an integer product's second operand is centred, if the rewrite can prove the shapes
    /// of its zero points.
    pub fn integer_product(&self, node: &pb::Node) -> Option<Centring> {
        if !node.domain.is_empty() || node.input.len() < 2 || node.output.len() != 1 {
            return None;
        }
        let (a_zero, b_zero) = (input(node, 2), input(node, 3));
        if !self.is_scalar(a_zero) {
            return None;
        }
        let vector = b_zero.is_some_and(|z| self.constants.get(z).is_some_and(|d| d.len() == 1));
        match node.op_type.as_str() {
            // B's zero point: a scalar, or one per column ([N], which broadcasts over [.., K, N]).
            "MatMulInteger" if self.is_scalar(b_zero) || vector => Some(Centring::AsIs),
            // W's zero point: a scalar, or one per output channel ([M] for W [M, C, k...]),
            // reshaped to [M, 1, 1...] to broadcast.
            "ConvInteger" if self.is_scalar(b_zero) => Some(Centring::AsIs),
            "ConvInteger" if vector => {
                let rank = self.constants.get(&node.input[1])?.len();
                (rank >= 3).then_some(Centring::PerChannel { rank })
            }
            _ => None,
        }
    }
}

pub(crate) fn is_dynamic_quantize(node: &pb::Node) -> bool {
    node.op_type == "DynamicQuantizeLinear" && node.domain.is_empty() && node.input.len() == 1 && node.output.len() == 3
}

/// A `Cast` to FP32.
pub(crate) fn is_cast_to_float(node: &pb::Node) -> bool {
    node.op_type == "Cast" && node.domain.is_empty() && node.attribute.iter().any(|a| a.name == "to" && a.i == FLOAT)
}

/// The optional input `i` of `node`: `None` when absent or empty.
pub(crate) fn input(node: &pb::Node, i: usize) -> Option<&str> {
    node.input.get(i).map(String::as_str).filter(|s| !s.is_empty())
}

/// How the second operand's zero point of an integer product broadcasts.
#[derive(Clone, Copy)]
pub(crate) enum Centring {
    AsIs,
    PerChannel { rank: usize },
}
