//! The tract backend: pure Rust, CPU everywhere, the one the static binary carries.

mod datum;
mod max_pool;
mod plans;
mod pool;
mod quantize;
mod quantize_linear;
mod rewrite;
mod small_conv;

use std::sync::Arc;
use std::time::Instant;

use tract_onnx::prelude::{
    Framework, InferenceFact, InferenceModel, IntoTValue, TDim, TValue, TVec, Tensor as TractTensor, TractError,
    TractResult, TypedRunnableModel, tvec,
};

use self::datum::{datum_type, from_datum_type};
use self::plans::Plans;
use self::pool::Pool;
use super::session::{Backend, BackendError, OTHER_BACKEND, PlanStats, Session, SessionOptions, Specialised};
use crate::onnx::ModelGraph;
use crate::onnx::Signature;
use crate::tensor::{DataType, Tensor, max_abs_diff};

/// The tract backend.
pub struct Tract;

impl Backend for Tract {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn check(&self, graph: &ModelGraph) -> Result<(), BackendError> {
        let registry = &tract_onnx::onnx().op_register.0;
        if let Some(node) = graph.nodes.iter().find(|n| !registry.contains_key(&n.op_type)) {
            return Err(BackendError::UnsupportedOp {
                path: graph.path.clone(),
                backend: "tract",
                op: node.op_type.clone(),
                node: node.name.clone(),
                hint: OTHER_BACKEND,
            });
        }
        let softmax = rewrite::analyse(&graph.bytes)
            .map_err(|reason| BackendError::Refused { path: graph.path.clone(), reason })?;
        if !softmax.unhandled.is_empty() {
            return Err(BackendError::Refused {
                path: graph.path.clone(),
                reason: format!(
                    "{}: the tract backend folds that form into an element-wise table and computes wrong \
                     probabilities, so the model is refused; quantize it again with per-tensor activations, or \
                     with the Softmax left in float",
                    softmax.unhandled.join("; ")
                ),
            });
        }
        for spec in graph.signature.inputs.iter().chain(&graph.signature.outputs) {
            if spec.datatype == DataType::Bytes {
                return Err(BackendError::Refused {
                    path: graph.path.clone(),
                    reason: format!(
                        "tensor `{}` is a string tensor, which the tract backend does not serve",
                        spec.name
                    ),
                });
            }
        }
        Ok(())
    }

    fn has_thread_pool(&self) -> bool {
        pool::BUILT
    }

    fn pool_may_lose(&self) -> bool {
        pool::BUILT
    }

    fn prepare(&self, graph: &ModelGraph, options: &SessionOptions) -> Result<Box<dyn Session>, BackendError> {
        let err = |e: TractError| BackendError::Prepare {
            path: graph.path.clone(),
            backend: "tract",
            message: format!("{e:#}"),
            hint: OTHER_BACKEND,
        };
        // Value infos and output shapes in exported models are often stale or use symbols tract
        // cannot unify; the input facts set below are the only shapes tract needs.
        let mut onnx = tract_onnx::onnx().with_ignore_output_shapes(true).with_ignore_value_info(true);
        quantize::register(&mut onnx);
        let bytes = for_tract(graph)?;
        let model = onnx.model_for_read(&mut &bytes[..]).map_err(err)?;
        // One plan for every shape when tract can analyse the symbolic dimensions; else (a real
        // model's `Reshape` of a computed shape, a `Concat` of dimensions it cannot unify) a plan
        // per concrete shape, prepared on first use. Models without symbolic dimensions always
        // take the first path, so their errors are reported at load as before.
        let symbolic = match symbolic_plan(&model, &graph.signature) {
            Ok(plan) => Some(plan),
            Err(e) if graph.signature.inputs.iter().all(|s| s.shape.iter().all(|&d| d >= 0)) => return Err(err(e)),
            Err(e) => {
                tracing::info!(
                    model = %graph.path.display(),
                    reason = %format!("{e:#}").lines().next().unwrap_or_default(),
                    "tract cannot plan this model for every shape at once: one plan per input shape, prepared on first use"
                );
                None
            }
        };
        let pool =
            Pool::new(options.intra_op_threads.unwrap_or_else(crate::threads::available)).map_err(|message| {
                BackendError::Prepare { path: graph.path.clone(), backend: "tract", message, hint: "" }
            })?;
        let plans = Arc::new(Plans::new(model, graph.signature.clone(), options.plan_cache.max(1)));
        // Declared shapes are prepared now, and kept.
        for shapes in &options.shapes {
            plans.prepare(shapes, true).map_err(|e| match e {
                BackendError::Run(message) => BackendError::Prepare {
                    path: graph.path.clone(),
                    backend: "tract",
                    message: format!("for input shapes {shapes:?}: {message}"),
                    hint: OTHER_BACKEND,
                },
                other => other,
            })?;
        }
        Ok(Box::new(TractSession { symbolic, plans, signature: graph.signature.clone(), pool }))
    }
}

/// The plan for every shape: the inputs' symbolic dimensions kept as symbols.
fn symbolic_plan(model: &InferenceModel, signature: &Signature) -> TractResult<Arc<TypedRunnableModel>> {
    let mut model = model.clone();
    for (i, spec) in signature.inputs.iter().enumerate() {
        let dims: Vec<TDim> = spec
            .shape
            .iter()
            .enumerate()
            .map(|(axis, &d)| if d < 0 { model.sym(&format!("{}_{axis}", spec.name)).into() } else { TDim::from(d) })
            .collect();
        model.set_input_fact(i, InferenceFact::dt_shape(datum_type(spec.datatype), dims))?;
    }
    plans::optimised_plan(model)
}

/// The model's bytes as tract is to read them: integer products and a quantized Softmax
/// rewritten (see [`rewrite`]).
fn for_tract(graph: &ModelGraph) -> Result<std::borrow::Cow<'_, [u8]>, BackendError> {
    let refused = |reason: String| BackendError::Refused { path: graph.path.clone(), reason };
    let analysis = rewrite::analyse(&graph.bytes).map_err(refused)?;
    if analysis.rewrite.is_empty() {
        return Ok(graph.bytes.as_slice().into());
    }
    tracing::info!(
        model = %graph.path.display(),
        rewritten = %analysis.summary(&graph.bytes).map_err(refused)?,
        "quantized operators rewritten into forms tract runs fast and right (docs/backends.md)"
    );
    Ok(rewrite::rewrite(&graph.bytes, &analysis.rewrite).map_err(refused)?.into())
}

struct TractSession {
    /// The plan for every shape, when tract could analyse the symbolic dimensions.
    symbolic: Option<Arc<TypedRunnableModel>>,
    /// Plans for concrete shapes: the declared ones, and (without a symbolic plan) every shape
    /// seen, within the cache's bound. Shared with the same model's sessions on other threads.
    plans: Arc<Plans>,
    signature: Signature,
    /// The threads one call runs on.
    pool: Pool,
}

impl Session for TractSession {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape.clone()).collect();
        let plan = match (self.plans.lookup(&shapes), &self.symbolic) {
            (Some(plan), _) => plan,
            (None, Some(plan)) => plan.clone(),
            (None, None) => self.plans.prepare(&shapes, false)?,
        };
        let values = tract_values(inputs)?;
        let outputs = self.pool.run(|| plan.run(values)).map_err(run_err)?;
        outputs.into_iter().zip(&self.signature.outputs).map(|(v, spec)| to_tensor(&spec.name, v)).collect()
    }

    fn plans(&self) -> Option<PlanStats> {
        Some(PlanStats { symbolic: self.symbolic.is_some(), ..self.plans.stats() })
    }

    fn batch_may_lose(&self) -> bool {
        true
    }

    /// tract optimises a plan less where a dimension is a symbol (MobileNetV3 with a symbolic
    /// batch ran 3.3× slower than planned for batch 1), so a model with a plan for every shape
    /// also gets plans for the warm-up input's shapes, and for one row of it, where they are
    /// measurably faster.
    fn specialise(&self, warm_up: &[Tensor], tolerance: f64) -> Vec<Specialised> {
        let Some(general) = &self.symbolic else { return Vec::new() };
        if warm_up.is_empty() || !self.signature.inputs.iter().any(|s| s.shape.iter().any(|&d| d < 0)) {
            return Vec::new();
        }
        let mut done = Vec::new();
        for input in warm_up_and_one_row(warm_up, &self.signature) {
            let shapes: Vec<Vec<usize>> = input.iter().map(|t| t.shape.clone()).collect();
            if self.plans.lookup(&shapes).is_some() {
                continue;
            }
            match self.measure(general, &input, tolerance) {
                Ok(s) => done.push(s),
                Err(e) => {
                    tracing::warn!(shapes = ?shapes, error = %e, "no plan for these concrete shapes: the plan for every shape serves them")
                }
            }
        }
        done
    }

    fn on_threads(&self, threads: usize) -> Option<Box<dyn Session>> {
        let pool =
            Pool::new(threads).map_err(|e| tracing::warn!(threads, error = %e, "no session on other threads")).ok()?;
        Some(Box::new(TractSession {
            symbolic: self.symbolic.clone(),
            plans: self.plans.clone(),
            signature: self.signature.clone(),
            pool,
        }))
    }
}

impl TractSession {
    /// A plan for `input`'s shapes timed against `general` on it, and held when it is faster
    /// and answers the same within `tolerance`.
    fn measure(
        &self,
        general: &Arc<TypedRunnableModel>,
        input: &[Tensor],
        tolerance: f64,
    ) -> Result<Specialised, BackendError> {
        let shapes: Vec<Vec<usize>> = input.iter().map(|t| t.shape.clone()).collect();
        let concrete = self.plans.build(&shapes)?;
        let run = |plan: &Arc<TypedRunnableModel>| -> Result<(u64, Vec<Tensor>), BackendError> {
            let values = tract_values(input)?;
            let started = Instant::now();
            let outputs = self.pool.run(|| plan.run(values)).map_err(run_err)?;
            let us = started.elapsed().as_micros() as u64;
            let outputs = outputs.into_iter().zip(&self.signature.outputs).map(|(v, o)| to_tensor(&o.name, v));
            Ok((us, outputs.collect::<Result<_, _>>()?))
        };
        // The fastest of a few calls of each, alternated so that a burst of other load on the
        // box falls on both.
        let (mut general_us, mut concrete_us, mut diff) = (u64::MAX, u64::MAX, 0f64);
        for _ in 0..SPECIALISE_ROUNDS {
            let (g_us, g_out) = run(general)?;
            let (c_us, c_out) = run(&concrete.plan)?;
            general_us = general_us.min(g_us);
            concrete_us = concrete_us.min(c_us);
            diff = g_out.iter().zip(&c_out).map(|(g, c)| max_abs_diff(g, c)).fold(diff, f64::max);
        }
        let faster = (concrete_us as f64) < general_us as f64 * Specialised::MARGIN;
        if faster && diff > tolerance {
            tracing::warn!(shapes = ?shapes, diff, tolerance, "a plan for concrete shapes answers differently from the plan for every shape: not kept");
        }
        let s = Specialised { shapes, general_us, concrete_us, kept: faster && diff <= tolerance };
        self.plans.specialised(s.clone(), concrete);
        Ok(s)
    }
}

/// Calls of each plan when a concrete plan is measured against the general one at load.
const SPECIALISE_ROUNDS: usize = 3;

/// The warm-up input, and its first row where every input's first dimension is symbolic and
/// the warm-up has more than one row.
fn warm_up_and_one_row(warm_up: &[Tensor], signature: &Signature) -> Vec<Vec<Tensor>> {
    let batched = signature.inputs.iter().all(|s| s.shape.first().is_some_and(|&d| d < 0))
        && warm_up.iter().all(|t| t.shape.first().is_some_and(|&rows| rows > 1));
    let one_row: Option<Vec<Tensor>> = batched.then(|| warm_up.iter().map(|t| t.first_rows(1)).collect()).flatten();
    std::iter::once(warm_up.to_vec()).chain(one_row).collect()
}

fn run_err(e: TractError) -> BackendError {
    BackendError::Run(format!("{e:#}"))
}

fn tract_values(inputs: &[Tensor]) -> Result<TVec<TValue>, BackendError> {
    let mut values = tvec![];
    for input in inputs {
        let mut t = TractTensor::zero_dt(datum_type(input.datatype), &input.shape).map_err(run_err)?;
        t.as_bytes_mut().copy_from_slice(&input.data);
        values.push(t.into_tvalue());
    }
    Ok(values)
}

fn to_tensor(name: &str, v: TValue) -> Result<Tensor, BackendError> {
    let datatype = from_datum_type(v.datum_type()).ok_or_else(|| {
        BackendError::Run(format!("output `{name}` has type {:?}, which V2 cannot carry", v.datum_type()))
    })?;
    Ok(Tensor { name: name.to_owned(), datatype, shape: v.shape().to_vec(), data: v.as_bytes().to_vec() })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::golden::{Golden, GoldenError};

    fn hazard() -> ModelGraph {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/hazards/digits-edge-qsoftmax.onnx");
        ModelGraph::read(&path).unwrap()
    }

    fn golden_check(graph: &ModelGraph, session: &dyn Session) -> Result<f64, GoldenError> {
        let golden_path = graph.path.with_file_name("digits-edge-qsoftmax.golden.json");
        Golden::read(&golden_path).unwrap().check(&golden_path, session)
    }

    #[test]
    fn the_quantized_softmax_hazard_is_real() {
        // Guards the reason for the rewrite: tract reading the file as it is answers wrong.
        let graph = hazard();
        let onnx = tract_onnx::onnx().with_ignore_output_shapes(true).with_ignore_value_info(true);
        let model = onnx.model_for_read(&mut graph.bytes.as_slice()).unwrap();
        let plan = symbolic_plan(&model, &graph.signature).unwrap();
        let session = TractSession {
            symbolic: Some(plan),
            plans: Plans::new(model, graph.signature.clone(), 1).into(),
            signature: graph.signature.clone(),
            pool: Pool::new(1).unwrap(),
        };
        let err = golden_check(&graph, &session).unwrap_err();
        assert!(matches!(err, GoldenError::Mismatch { .. }), "{err}");
    }

    #[test]
    fn the_quantized_softmax_is_served_correctly_once_rewritten() {
        let graph = hazard();
        Tract.check(&graph).unwrap();
        let session = Tract.prepare(&graph, &SessionOptions::default()).unwrap();
        // Within the golden file's tolerance: one output quantization step (ONNX Runtime's fused
        // kernel rounds differently; the file says so).
        golden_check(&graph, session.as_ref()).unwrap();
    }

    /// The ops of tract's batch-1 plan for `graph` read as rewritten with `outputs` chosen, and
    /// its answer to `input`.
    fn plan_and_answer(graph: &ModelGraph, outputs: &[String], input: &[Tensor]) -> (Vec<String>, Vec<Tensor>) {
        let mut onnx = tract_onnx::onnx().with_ignore_output_shapes(true).with_ignore_value_info(true);
        quantize::register(&mut onnx);
        let bytes = rewrite::rewrite(&graph.bytes, outputs).unwrap();
        let model = onnx.model_for_read(&mut &bytes[..]).unwrap();
        let plans = Plans::new(model, graph.signature.clone(), 1);
        let shapes: Vec<Vec<usize>> = input.iter().map(|t| t.shape.clone()).collect();
        let plan = plans.build(&shapes).unwrap().plan;
        let ops = plan.model().nodes().iter().map(|n| n.op().name().to_string()).collect();
        let outputs = plan.run(tract_values(input).unwrap()).unwrap();
        let answer = outputs.into_iter().zip(&graph.signature.outputs).map(|(v, o)| to_tensor(&o.name, v).unwrap());
        (ops, answer.collect())
    }

    #[test]
    fn dynamic_quantization_runs_on_outposts_operator_centred_and_answers_bit_for_bit_as_in_uint8() {
        for name in ["digits-edge-dynamic", "digits-cnn-dynamic"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../models/{name}.onnx"));
            let graph = ModelGraph::read(&path).unwrap();
            let golden_path = path.with_file_name(format!("{name}.golden.json"));
            let golden = Golden::read(&golden_path).unwrap();
            let input: Vec<Tensor> = golden.inputs.iter().map(|t| t.to_tensor().unwrap()).collect();
            let all = rewrite::analyse(&graph.bytes).unwrap().rewrite;
            let (ops, centred) = plan_and_answer(&graph, &all, &input);
            assert!(ops.iter().any(|op| op == quantize::CENTRED_OP), "{name}: {ops:?}");
            assert!(!ops.iter().any(|op| op.contains("DynamicQuantizeLinear")), "{name}: {ops:?}");
            // The quantizers left as they are: Outpost's UINT8 operator, cast and centred by the
            // products. The centred values are the same integers, so the answers are the same bits.
            let quantizers: Vec<&str> = graph
                .nodes
                .iter()
                .filter(|n| n.op_type == "DynamicQuantizeLinear")
                .map(|n| n.outputs[0].as_str())
                .collect();
            let unfused: Vec<String> = all.iter().filter(|o| !quantizers.contains(&o.as_str())).cloned().collect();
            let (ops, uint8) = plan_and_answer(&graph, &unfused, &input);
            assert!(ops.iter().any(|op| op == "OutpostDynamicQuantizeLinearU8"), "{name}: {ops:?}");
            assert!(!ops.iter().any(|op| op == quantize::CENTRED_OP), "{name}: {ops:?}");
            assert_eq!(centred, uint8, "{name}");
            // And the model still gives ONNX Runtime's answer.
            let session = Tract.prepare(&graph, &SessionOptions::default()).unwrap();
            golden.check(&golden_path, session.as_ref()).unwrap();
        }
    }

    #[test]
    fn static_quantization_runs_on_outposts_operators() {
        let (graph, golden, golden_path, _) = digits_cnn();
        let onnx = tract_onnx::onnx().with_ignore_output_shapes(true).with_ignore_value_info(true);
        let model = onnx.model_for_read(&mut &for_tract(&graph).unwrap()[..]).unwrap();
        let plan = symbolic_plan(&model, &graph.signature).unwrap();
        let ops: Vec<String> = plan.model().nodes().iter().map(|n| n.op().name().to_string()).collect();
        // Every QuantizeLinear read back by a DequantizeLinear became one round trip; none of
        // tract's own is left to run.
        let order = plan.model().eval_order().unwrap();
        let run: Vec<&str> = order.iter().map(|&id| ops[id].as_str()).collect();
        assert!(run.contains(&"OutpostQuantizeDequantize"), "{run:?}");
        assert!(!run.iter().any(|op| op.starts_with("QuantizeLinear")), "{run:?}");
        // And the model still gives ONNX Runtime's answer.
        let session = Tract.prepare(&graph, &SessionOptions::default()).unwrap();
        golden.check(&golden_path, session.as_ref()).unwrap();
    }

    #[test]
    fn unsupported_operators_are_named_at_load() {
        let mut graph = hazard();
        graph.nodes[3].op_type = "FancyAttention".into();
        graph.nodes[3].name = "attn0".into();
        let err = Tract.check(&graph).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("the tract backend does not support operator `FancyAttention` (node `attn0`)"), "{text}");
        assert_eq!(text.contains("backend = \"ort\""), cfg!(feature = "ort"), "{text}");
    }

    fn digits_cnn() -> (ModelGraph, Golden, std::path::PathBuf, Vec<Tensor>) {
        // A symbolic batch, and a golden input of 16 rows.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits-cnn.onnx");
        let golden_path = path.with_file_name("digits-cnn.golden.json");
        let golden = Golden::read(&golden_path).unwrap();
        let inputs = golden.inputs.iter().map(|t| t.to_tensor().unwrap()).collect();
        (ModelGraph::read(&path).unwrap(), golden, golden_path, inputs)
    }

    #[test]
    fn plans_for_the_warm_up_shapes_are_measured_and_answer_as_before() {
        let (graph, golden, golden_path, inputs) = digits_cnn();
        let session = Tract.prepare(&graph, &SessionOptions::default()).unwrap();
        let done = session.specialise(&inputs, golden.allowed_diff());
        let shapes: Vec<_> = done.iter().map(|s| s.shapes.clone()).collect();
        assert_eq!(shapes, vec![vec![vec![16, 1, 8, 8]], vec![vec![1, 1, 8, 8]]], "the golden shapes, then one row");
        let stats = session.plans().unwrap();
        assert_eq!(stats.specialised, done);
        assert_eq!(stats.plans, done.iter().filter(|s| s.kept).count(), "{done:?}");
        // Whichever plan serves each shape now, the answers are the golden ones.
        golden.check(&golden_path, session.as_ref()).unwrap();
        let one_row: Vec<Tensor> = inputs.iter().map(|t| t.first_rows(1).unwrap()).collect();
        let expected = golden.outputs[0].to_tensor().unwrap().first_rows(1).unwrap();
        let answer = session.run(&one_row).unwrap().remove(0);
        assert!(max_abs_diff(&answer, &expected) <= golden.allowed_diff());
        // Shapes a kept plan serves are not measured again.
        let again = session.specialise(&inputs, golden.allowed_diff());
        assert_eq!(again.len(), done.iter().filter(|s| !s.kept).count(), "{again:?}");
    }

    #[test]
    fn a_plan_that_answers_differently_is_not_kept() {
        let (graph, _, _, inputs) = digits_cnn();
        let session = Tract.prepare(&graph, &SessionOptions::default()).unwrap();
        // No difference is within a negative tolerance, however fast the plan.
        let done = session.specialise(&inputs, -1.0);
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|s| !s.kept), "{done:?}");
        assert_eq!(session.plans().unwrap().plans, 0);
    }

    #[test]
    fn declared_shapes_are_not_measured_again() {
        let (graph, golden, _, inputs) = digits_cnn();
        let options = SessionOptions {
            shapes: vec![vec![vec![16, 1, 8, 8]], vec![vec![1, 1, 8, 8]]],
            ..SessionOptions::default()
        };
        let session = Tract.prepare(&graph, &options).unwrap();
        assert_eq!(session.specialise(&inputs, golden.allowed_diff()), vec![]);
        assert_eq!(session.plans().unwrap().plans, 2);
    }
}
