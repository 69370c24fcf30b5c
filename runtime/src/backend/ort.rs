//! The ONNX Runtime backend: GPUs and NPUs through execution providers, loaded at run time from
//! a `libonnxruntime.so` that the box provides (never downloaded, never linked at build time).
//!
//! Per model, an ordered list of execution providers is tried: a provider this
//! `libonnxruntime.so` was not built with, or that fails to register (no device, missing
//! driver libraries), is skipped with the reason logged; `cpu` always works. The provider a model
//! ends up on is reported in its metadata.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::ep::{self, ArbitrarilyConfigurableExecutionProvider, ExecutionProvider, ExecutionProviderDispatch};
use ort::session::Session as OrtSession;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, TensorElementType, ValueType};

use super::session::{Backend, BackendError, ProviderChoice, Session, SessionOptions};
use crate::onnx::ModelGraph;
use crate::onnx::Signature;
use crate::tensor::{DataType, Tensor};

/// The environment variable naming `libonnxruntime.so` when the configuration does not.
pub const LIBRARY_ENV: &str = "ORT_DYLIB_PATH";

static LIBRARY: OnceLock<PathBuf> = OnceLock::new();
static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Sets the library path from configuration (first call wins; before any model loads).
pub fn set_library(path: &Path) {
    let _ = LIBRARY.set(path.to_owned());
}

/// The library's name when neither the configuration nor [`LIBRARY_ENV`] names a path: the
/// dynamic loader's own search finds it (`LD_LIBRARY_PATH`, then `/etc/ld.so.cache`, which on
/// Debian covers `/usr/local/lib`), as for any shared library.
pub const DEFAULT_LIBRARY: &str = "libonnxruntime.so";

/// Loads ONNX Runtime once per process; later calls return the same outcome.
fn environment() -> Result<&'static ort::environment::Environment, BackendError> {
    let env = ENVIRONMENT.get_or_init(|| {
        let path = LIBRARY
            .get()
            .cloned()
            .or_else(|| std::env::var_os(LIBRARY_ENV).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_LIBRARY));
        // A bare name is the loader's to find; a path must name a file.
        let searched = path.components().count() == 1;
        if !searched && !path.is_file() {
            return Err(format!("ONNX Runtime library {} does not exist", path.display()));
        }
        let builder = ort::init_from(&path).map_err(|e| {
            if searched {
                format!(
                    "cannot load ONNX Runtime: the dynamic loader found no usable {} ({e}); install it where the \
                     loader looks (e.g. /usr/local/lib, then ldconfig) or set server.ort_library or {LIBRARY_ENV} \
                     to its path",
                    path.display()
                )
            } else {
                format!("cannot load ONNX Runtime from {}: {e}", path.display())
            }
        })?;
        let env = builder.with_name("outpost").build().map_err(|e| format!("cannot start ONNX Runtime: {e}"))?;
        tracing::info!(library = %path.display(), "ONNX Runtime loaded");
        Ok(env)
    });
    env.as_ref().map_err(|e| BackendError::Library(e.clone()))
}

/// The ONNX Runtime backend.
pub struct Ort;

impl Backend for Ort {
    fn name(&self) -> &'static str {
        "ort"
    }

    fn check(&self, graph: &ModelGraph) -> Result<(), BackendError> {
        environment()?;
        for spec in graph.signature.inputs.iter().chain(&graph.signature.outputs) {
            if spec.datatype == DataType::Bytes {
                return Err(BackendError::Refused {
                    path: graph.path.clone(),
                    reason: format!("tensor `{}` is a string tensor, which outpost does not serve", spec.name),
                });
            }
        }
        Ok(())
    }

    fn has_thread_pool(&self) -> bool {
        true
    }

    fn prepare(&self, graph: &ModelGraph, options: &SessionOptions) -> Result<Box<dyn Session>, BackendError> {
        let env = environment()?;
        let wanted: Vec<String> =
            if options.providers.is_empty() { vec!["cpu".into()] } else { options.providers.clone() };
        let mut skipped = Vec::new();
        for name in &wanted {
            let provider = match provider(name, options) {
                Ok(p) => p,
                Err(reason) => {
                    skipped.push(format!("{name}: {reason}"));
                    continue;
                }
            };
            let instances = options.instances.max(1);
            let mut sessions = Vec::with_capacity(instances);
            let mut failure = None;
            for _ in 0..instances {
                match build(env, graph, options, provider.clone()) {
                    Ok(s) => sessions.push(Mutex::new(s)),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            match failure {
                None => {
                    let choice = ProviderChoice { provider: name.clone(), skipped };
                    tracing::info!(model = %graph.path.display(), provider = %name, skipped = ?choice.skipped, "ONNX Runtime execution provider chosen");
                    return Ok(Box::new(OrtRunner { sessions, signature: graph.signature.clone(), choice }));
                }
                // An unsupported operator or a bad model fails on every provider: say so now.
                Some(e) if name == "cpu" => {
                    return Err(BackendError::Prepare {
                        path: graph.path.clone(),
                        backend: "ort",
                        message: e,
                        hint: "",
                    });
                }
                Some(e) => skipped.push(format!("{name}: {e}")),
            }
        }
        Err(BackendError::Prepare {
            path: graph.path.clone(),
            backend: "ort",
            message: format!("no execution provider could run it ({})", skipped.join("; ")),
            hint: "",
        })
    }
}

/// The execution provider named in configuration, with its options, if this library has it.
fn provider(name: &str, options: &SessionOptions) -> Result<ExecutionProviderDispatch, String> {
    let opts = options.provider_options.get(name).cloned().unwrap_or_default();
    fn available<E: ExecutionProvider>() -> Result<(), String> {
        match E::is_available() {
            Ok(true) => Ok(()),
            Ok(false) => Err("not built into this libonnxruntime".into()),
            Err(e) => Err(e.to_string()),
        }
    }
    fn with_options<E: ArbitrarilyConfigurableExecutionProvider>(mut ep: E, opts: &[(String, String)]) -> E {
        for (k, v) in opts {
            ep = ep.with_arbitrary_config(k, v);
        }
        ep
    }
    match name {
        "cpu" => {
            if !opts.is_empty() {
                return Err("the cpu provider takes no options".into());
            }
            // No arena: with dynamic shapes an arena keeps every size it ever served.
            Ok(ep::CPU::default().with_arena_allocator(false).build().error_on_failure())
        }
        "cuda" => {
            available::<ep::CUDA>()?;
            Ok(with_options(ep::CUDA::default(), &opts).build().error_on_failure())
        }
        "tensorrt" => {
            available::<ep::TensorRT>()?;
            Ok(with_options(ep::TensorRT::default(), &opts).build().error_on_failure())
        }
        "openvino" => {
            available::<ep::OpenVINO>()?;
            Ok(with_options(ep::OpenVINO::default(), &opts).build().error_on_failure())
        }
        "qnn" => {
            available::<ep::QNN>()?;
            Ok(with_options(ep::QNN::default(), &opts).build().error_on_failure())
        }
        other => Err(format!("unknown execution provider `{other}`")),
    }
}

fn build(
    env: &ort::environment::Environment,
    graph: &ModelGraph,
    options: &SessionOptions,
    provider: ExecutionProviderDispatch,
) -> Result<OrtSession, String> {
    // On x86 CPUs without AVX-512 VNNI, ONNX Runtime's u8s8 kernels multiply with VPMADDUBSW,
    // which saturates at int16: an INT8 model's answer then depends on the CPU (by 0.22 in
    // probability on a sample CNN). `session.x64quantprecision` has it promote such products to
    // u8u8 where the weights could saturate, so every CPU computes the exact integer arithmetic
    // (as tract does and as VNNI CPUs do), at some cost in speed; `exact_int8 = false` trades it
    // back. ONNX Runtime 1.31 cannot start some S8S8 QDQ models with it ("Attempt to replace the
    // existing tensor"): those run without it, said in the log, and their golden check decides.
    if !options.fast_int8 {
        match build_with(env, graph, options, provider.clone(), true) {
            Ok(session) => return Ok(session),
            Err(e) => tracing::warn!(
                model = %graph.path.display(),
                error = %e,
                "ONNX Runtime cannot apply session.x64quantprecision to this model: running it without (its INT8 \
                 answers may then move by a quantization step on x86 CPUs without VNNI)"
            ),
        }
    }
    build_with(env, graph, options, provider, false)
}

fn build_with(
    env: &ort::environment::Environment,
    graph: &ModelGraph,
    options: &SessionOptions,
    provider: ExecutionProviderDispatch,
    exact_int8: bool,
) -> Result<OrtSession, String> {
    let mut builder = OrtSession::builder(env).map_err(|e| e.to_string())?;
    builder = builder.with_optimization_level(GraphOptimizationLevel::All).map_err(|e| e.to_string())?;
    // Memory patterns are planned per input shape: off, so dynamic batch sizes do not add up.
    builder = builder.with_memory_pattern(false).map_err(|e| e.to_string())?;
    // Always a number: left to itself, ONNX Runtime sizes its pool by physical cores and pins
    // each thread to one (sched_setaffinity), which fights the box's other work, and which the
    // systemd unit's system-call filter refuses (an error line per thread). The default is what
    // this process may use (its affinity mask and cgroup quota); the model's loader then measures
    // whether one thread does as well (`crate::threads`).
    let intra = options.intra_op_threads.unwrap_or_else(crate::threads::available);
    builder = builder.with_intra_threads(intra).map_err(|e| e.to_string())?;
    if let Some(n) = options.inter_op_threads {
        builder = builder.with_inter_threads(n).map_err(|e| e.to_string())?;
    }
    if exact_int8 {
        builder = builder.with_config_entry("session.x64quantprecision", "1").map_err(|e| e.to_string())?;
    }
    builder = builder.with_execution_providers([provider]).map_err(|e| e.to_string())?;
    builder.commit_from_memory(&graph.bytes).map_err(|e| e.to_string())
}

/// Prepared sessions, one per worker (ONNX Runtime's Rust API runs a session through `&mut`).
struct OrtRunner {
    sessions: Vec<Mutex<OrtSession>>,
    signature: Signature,
    choice: ProviderChoice,
}

impl Session for OrtRunner {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn provider(&self) -> Option<&ProviderChoice> {
        Some(&self.choice)
    }

    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
        let run_err = |e: ort::Error| BackendError::Run(e.to_string());
        let values: Vec<(String, DynValue)> =
            inputs.iter().map(|t| Ok((t.name.clone(), to_value(t)?))).collect::<Result<_, BackendError>>()?;
        // Take a free session; if all are busy, wait on the first.
        let mut guard = self.sessions.iter().find_map(|m| m.try_lock().ok());
        if guard.is_none() {
            guard = Some(self.sessions[0].lock().unwrap_or_else(|e| e.into_inner()));
        }
        let mut session = guard.expect("a session");
        let outputs = session.run(values).map_err(run_err)?;
        self.signature
            .outputs
            .iter()
            .map(|spec| {
                let v =
                    outputs.get(&spec.name).ok_or_else(|| BackendError::Run(format!("no output `{}`", spec.name)))?;
                from_value(&spec.name, v)
            })
            .collect()
    }
}

fn to_value(t: &Tensor) -> Result<DynValue, BackendError> {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    let err = |e: ort::Error| BackendError::Run(format!("input `{}`: {e}", t.name));
    macro_rules! make {
        ($ty:ty, $conv:expr) => {{
            let size = std::mem::size_of::<$ty>();
            let v: Vec<$ty> = t.data.chunks_exact(size).map($conv).collect();
            ort::value::Tensor::from_array((shape, v)).map(|x| x.into_dyn()).map_err(err)
        }};
    }
    macro_rules! le {
        ($ty:ty) => {
            make!($ty, |c| <$ty>::from_le_bytes(c.try_into().expect("chunk of the type's size")))
        };
    }
    match t.datatype {
        DataType::Bool => make!(bool, |c| c[0] != 0),
        DataType::Uint8 => le!(u8),
        DataType::Int8 => le!(i8),
        DataType::Uint16 => le!(u16),
        DataType::Int16 => le!(i16),
        DataType::Uint32 => le!(u32),
        DataType::Int32 => le!(i32),
        DataType::Uint64 => le!(u64),
        DataType::Int64 => le!(i64),
        DataType::Fp16 => make!(half::f16, |c| half::f16::from_le_bytes([c[0], c[1]])),
        DataType::Fp32 => le!(f32),
        DataType::Fp64 => le!(f64),
        DataType::Bytes => Err(BackendError::Run(format!("input `{}`: BYTES is not supported", t.name))),
    }
}

fn from_value(name: &str, v: &DynValue) -> Result<Tensor, BackendError> {
    let ValueType::Tensor { ty, .. } = v.dtype() else {
        return Err(BackendError::Run(format!("output `{name}` is not a tensor")));
    };
    let err = |e: ort::Error| BackendError::Run(format!("output `{name}`: {e}"));
    macro_rules! take {
        ($ty:ty, $dt:expr, $bytes:expr) => {{
            let (shape, data) = v.try_extract_tensor::<$ty>().map_err(err)?;
            Tensor {
                name: name.to_owned(),
                datatype: $dt,
                shape: shape.iter().map(|&d| d.max(0) as usize).collect(),
                data: data.iter().flat_map($bytes).collect(),
            }
        }};
    }
    Ok(match ty {
        TensorElementType::Bool => take!(bool, DataType::Bool, |b: &bool| [*b as u8]),
        TensorElementType::Uint8 => take!(u8, DataType::Uint8, |x: &u8| x.to_le_bytes()),
        TensorElementType::Int8 => take!(i8, DataType::Int8, |x: &i8| x.to_le_bytes()),
        TensorElementType::Uint16 => take!(u16, DataType::Uint16, |x: &u16| x.to_le_bytes()),
        TensorElementType::Int16 => take!(i16, DataType::Int16, |x: &i16| x.to_le_bytes()),
        TensorElementType::Uint32 => take!(u32, DataType::Uint32, |x: &u32| x.to_le_bytes()),
        TensorElementType::Int32 => take!(i32, DataType::Int32, |x: &i32| x.to_le_bytes()),
        TensorElementType::Uint64 => take!(u64, DataType::Uint64, |x: &u64| x.to_le_bytes()),
        TensorElementType::Int64 => take!(i64, DataType::Int64, |x: &i64| x.to_le_bytes()),
        TensorElementType::Float16 => take!(half::f16, DataType::Fp16, |x: &half::f16| x.to_le_bytes()),
        TensorElementType::Float32 => take!(f32, DataType::Fp32, |x: &f32| x.to_le_bytes()),
        TensorElementType::Float64 => take!(f64, DataType::Fp64, |x: &f64| x.to_le_bytes()),
        other => return Err(BackendError::Run(format!("output `{name}` has type {other:?}, which V2 cannot carry"))),
    })
}
