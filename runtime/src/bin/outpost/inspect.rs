//! `outpost inspect` and `outpost infer`: one model, without a server.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use outpost_runtime::onnx::ModelGraph;
use outpost_runtime::{backend, v2};

pub fn inspect(path: &Path, backend_name: &str) -> anyhow::Result<ExitCode> {
    let graph = ModelGraph::read(path)?;
    println!("model:   {}", path.display());
    println!("opset:   {}", graph.opset);
    for (kind, specs) in [("input", &graph.signature.inputs), ("output", &graph.signature.outputs)] {
        for s in specs {
            println!("{kind:7}  {} {} {}", s.name, s.datatype, s.shape_text());
        }
    }
    println!("ops:     {}", graph.operators().join(", "));
    let verdict = backend::by_name(backend_name).map_err(outpost_runtime::Error::from).and_then(|b| {
        b.check(&graph)?;
        Ok(b.prepare(&graph, &Default::default())?)
    });
    let session = match verdict {
        Ok(session) => session,
        Err(e) => {
            println!("runs on: not on {backend_name}: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    println!("runs on: {backend_name} (this build)");
    match session.plans() {
        Some(p) if p.symbolic => println!("shapes:  one plan serves every input shape"),
        Some(_) => println!(
            "shapes:  one plan per input shape: {backend_name} cannot plan the symbolic dimensions at once; declare \
             the model's `shapes` to prepare them at load, else the first request at each shape prepares one"
        ),
        None => println!("shapes:  any shape the inputs allow"),
    }
    // Tried with the golden inputs where they ship beside the model.
    let Some(golden_path) = outpost_runtime::golden::Golden::beside(path) else {
        println!("tried:   no golden file beside the model, so no inference was run");
        return Ok(ExitCode::SUCCESS);
    };
    let golden = outpost_runtime::golden::Golden::read(&golden_path)?;
    let shapes: Vec<String> = golden.inputs.iter().map(|t| format!("`{}` {:?}", t.name, t.shape)).collect();
    match golden.check(&golden_path, session.as_ref()) {
        Ok(diff) => {
            println!("tried:   {} (golden inputs): outputs match, largest difference {diff:e}", shapes.join(", "));
            let inputs: Vec<_> = golden.inputs.iter().filter_map(|t| t.to_tensor().ok()).collect();
            for s in session.specialise(&inputs, golden.allowed_diff()) {
                println!(
                    "plans:   for shapes {:?}: {} µs against {} µs for every shape: {}",
                    s.shapes,
                    s.concrete_us,
                    s.general_us,
                    if s.kept { "served by its own plan, as at load" } else { "the plan for every shape serves them" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("tried:   {} (golden inputs): {e}", shapes.join(", "));
            Ok(ExitCode::FAILURE)
        }
    }
}

pub fn infer(path: &Path, input: &Path, backend_name: &str) -> anyhow::Result<ExitCode> {
    let body = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let request = v2::request::parse(&body, None).map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
    let backend = backend::by_name(backend_name)?;
    let session = backend::load(backend.as_ref(), path, &Default::default())?;
    let inputs = v2::request::bind(request.inputs, &path.display().to_string(), session.signature(), false)
        .map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
    let t = Instant::now();
    let outputs = session.run(&inputs)?;
    let elapsed = t.elapsed();
    let outputs: Vec<serde_json::Value> = outputs
        .iter()
        .map(|o| serde_json::json!({ "name": o.name, "datatype": o.datatype, "shape": o.shape, "data": o.to_json() }))
        .collect();
    println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "outputs": outputs }))?);
    eprintln!("inference took {:.3} ms on {backend_name}", elapsed.as_secs_f64() * 1e3);
    Ok(ExitCode::SUCCESS)
}
