//! The nodes that replace a rewritten node, encoded, and the constants they add. Every name a
//! replacement adds starts with the replaced node's first output (unique in a graph, where node
//! names may be empty or repeated) followed by `/outpost_`.

use prost::Message;

use std::collections::HashSet;

use crate::backend::tract::quantize::CENTRED_OP;
use crate::backend::tract::rewrite::graph::{Centring, FLOAT, Graph, input, is_dynamic_quantize};
use crate::backend::tract::rewrite::wire::{Constant, Field, fields};
use crate::onnx::pb;

/// NodeProto.attribute.
const NODE_ATTRIBUTE: u32 = 5;
/// TensorProto.DataType INT32.
const INT32: i64 = 6;

pub(crate) struct Writer<'g> {
    graph: &'g Graph,
    /// First outputs of the nodes being rewritten.
    chosen: &'g HashSet<&'g str>,
    /// Outputs of the integer products among them.
    products: HashSet<&'g str>,
    constants: Vec<Constant>,
}

/// The domain of the operators only Outpost's tract backend reads.
const OUTPOST_DOMAIN: &str = "ai.outpost";

/// The replacement being written for one node.
struct Nodes<'a> {
    prefix: &'a str,
    list: Vec<Vec<u8>>,
}

impl Nodes<'_> {
    fn name(&self, part: &str) -> String {
        format!("{}/outpost_{part}", self.prefix)
    }

    /// Adds a node; `raw` are attribute fields copied from the node replaced.
    fn add(&mut self, op: &str, input: Vec<String>, output: String, attribute: Vec<pb::Attribute>, raw: &[Field]) {
        let node = pb::Node {
            name: format!("{output}/node"),
            input,
            output: vec![output],
            op_type: op.into(),
            attribute,
            domain: String::new(),
        };
        self.push(node, raw);
    }

    fn push(&mut self, node: pb::Node, raw: &[Field]) {
        let mut bytes = node.encode_to_vec();
        for f in raw {
            bytes.extend_from_slice(f.raw);
        }
        self.list.push(bytes);
    }

    /// A node of one output with no attributes, named `part`; returns the output.
    fn op(&mut self, op: &str, input: &[&str], part: &str) -> String {
        let output = self.name(part);
        self.add(op, input.iter().map(|s| s.to_string()).collect(), output.clone(), Vec::new(), &[]);
        output
    }

    fn cast(&mut self, x: &str, to: i64, output: String) {
        self.add("Cast", vec![x.into()], output, vec![int_attribute("to", to)], &[]);
    }
}

fn int_attribute(name: &str, i: i64) -> pb::Attribute {
    pb::Attribute { name: name.into(), i, r#type: pb::ATTRIBUTE_INT, ..Default::default() }
}

impl<'g> Writer<'g> {
    pub fn new(graph: &'g Graph, chosen: &'g HashSet<&'g str>) -> Writer<'g> {
        let products = graph
            .nodes
            .iter()
            .filter(|n| n.output.first().is_some_and(|o| chosen.contains(o.as_str())))
            .filter(|n| graph.integer_product(n).is_some())
            .map(|n| n.output[0].as_str())
            .collect();
        Writer { graph, chosen, products, constants: Vec::new() }
    }

    /// The constants the replacements read, to be added to the graph.
    pub fn constants(&self) -> &[Constant] {
        &self.constants
    }

    /// The encoded nodes that replace `node` (`payload`: its encoding).
    pub fn replace(&mut self, node: &pb::Node, payload: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        let mut nodes = Nodes { prefix: &node.output[0], list: Vec::new() };
        match node.op_type.as_str() {
            "DequantizeLinear" => {
                let centred = self.centred(&mut nodes, "x", &node.input[0], input(node, 2), None);
                nodes.add("Mul", vec![centred, node.input[1].clone()], node.output[0].clone(), Vec::new(), &[]);
            }
            "MatMulInteger" | "ConvInteger" => {
                let centring = self.graph.integer_product(node).ok_or("not an integer product the rewrite handles")?;
                self.integer_product(&mut nodes, node, centring, &fields(payload)?);
            }
            // The quantized output goes to the products as their centred operand; the scale and
            // zero point keep their names.
            "DynamicQuantizeLinear" => {
                // Every reader must be a product rewritten here that reads this node's zero point.
                if !self.graph.centres_for(node, &self.products) {
                    return Err(format!("`{}` has readers that are not rewritten products", node.output[0]));
                }
                let output = [centred(&node.output[0]), node.output[1].clone(), node.output[2].clone()];
                let name = format!("{}/node", output[0]);
                let (op_type, domain) = (CENTRED_OP.into(), OUTPOST_DOMAIN.into());
                let node = pb::Node {
                    name,
                    input: node.input.clone(),
                    output: output.into(),
                    op_type,
                    attribute: vec![],
                    domain,
                };
                nodes.push(node, &[]);
            }
            // A Cast to FP32 of a rewritten product reads the float product.
            "Cast" => nodes.add("Identity", vec![product(&node.input[0])], node.output[0].clone(), Vec::new(), &[]),
            other => return Err(format!("no rewrite for {other}")),
        }
        Ok(nodes.list)
    }

    /// `Cast(x) − Cast(zero)` in FP32 (the zero point reshaped to `zero_shape` if given).
    fn centred(
        &mut self,
        nodes: &mut Nodes,
        part: &str,
        x: &str,
        zero: Option<&str>,
        zero_shape: Option<Vec<i64>>,
    ) -> String {
        let x_float = nodes.name(&format!("{part}_float"));
        nodes.cast(x, FLOAT, x_float.clone());
        let Some(zero) = zero else { return x_float };
        let mut zero_float = nodes.name(&format!("{part}_zero_point"));
        nodes.cast(zero, FLOAT, zero_float.clone());
        if let Some(dims) = zero_shape {
            let shape = nodes.name(&format!("{part}_zero_point_shape"));
            self.constants.push(Constant::int64s(shape.clone(), dims));
            zero_float = nodes.op("Reshape", &[&zero_float, &shape], &format!("{part}_zero_point_reshaped"));
        }
        nodes.op("Sub", &[&x_float, &zero_float], &format!("{part}_centred"))
    }

    /// `y = MatMulInteger(a, b, a_zero, b_zero)` (or ConvInteger with its attributes) as the
    /// FP32 product of the centred operands (`{y}/outpost_product`), cast to INT32 as `y`.
    fn integer_product(&mut self, nodes: &mut Nodes, node: &pb::Node, centring: Centring, node_fields: &[Field]) {
        let a = match self.graph.producer(&node.input[0]) {
            // A quantizer is only rewritten where its readers read its zero point (`replace`).
            Some(q) if is_dynamic_quantize(q) && self.chosen.contains(node.input[0].as_str()) => {
                centred(&node.input[0])
            }
            _ => self.centred(nodes, "a", &node.input[0], input(node, 2), None),
        };
        let b_shape = match centring {
            Centring::AsIs => None,
            Centring::PerChannel { rank } => Some([-1].into_iter().chain(std::iter::repeat_n(1, rank - 1)).collect()),
        };
        let b = self.centred(nodes, "b", &node.input[1], input(node, 3), b_shape);
        let y = &node.output[0];
        let attributes: Vec<Field> = node_fields.iter().filter(|f| f.tag == NODE_ATTRIBUTE).copied().collect();
        let op = if node.op_type == "ConvInteger" { "Conv" } else { "MatMul" };
        nodes.add(op, vec![a, b], product(y), Vec::new(), &attributes);
        nodes.cast(&product(y), INT32, y.clone());
    }
}

/// The centred FP32 operand that replaces a quantizer's output `y`.
fn centred(y: &str) -> String {
    format!("{y}/outpost_centred")
}

/// The FP32 product that replaces an integer product's output `y`.
fn product(y: &str) -> String {
    format!("{y}/outpost_product")
}
