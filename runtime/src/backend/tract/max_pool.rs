//! `MaxPool` over f32 images with channels first and every window inside the image (no padding,
//! no dilation): the pooling of classic CNNs (LeNet's and VGG's 2×2 windows at stride 2).
//!
//! tract 0.23 runs a 2×2 window at stride 2 one output at a time, with a bounds check per tap
//! (its vectorised path is for stride 1 only): on the peer harness's LeNet-style CNN, two such
//! pools took a quarter of the 56 µs call (perf, docs/benchmarks.md). [`replace`] swaps tract's
//! operator in the finished plan for [`MaxPool`], which reduces the window's rows into one row,
//! element by element (the compiler vectorises it), then each window's columns; a large input's
//! images are split over the call's tract pool, as tract splits them.
//!
//! The values are tract's own: the largest of the window's values, NaN never chosen (a window of
//! NaN alone gives `f32::MIN`, as tract's does). Where tract's order of comparison and this one
//! differ, only the sign of a zero may: −0 and +0 compare equal.

use tract_onnx::prelude::multithread::par_chunks_mut;
use tract_onnx::tract_core::ops::cnn::{MaxPool as TractMaxPool, OptMaxPool, PaddingSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;
use tract_onnx::tract_hir::internal::*;

/// Replaces each of tract's `MaxPool` in an optimised plan that [`MaxPool`] can run.
pub(crate) fn replace(model: &mut TypedModel) -> TractResult<()> {
    let mut found = vec![];
    for node in model.nodes() {
        let (spec, indices) = if let Some(op) = node.op_as::<OptMaxPool>() {
            (&op.pool_spec, op.with_index_outputs)
        } else if let Some(op) = node.op_as::<TractMaxPool>() {
            (&op.pool_spec, op.with_index_outputs)
        } else {
            continue;
        };
        let input = model.outlet_fact(node.inputs[0])?;
        let Some(shape) = input.shape.as_concrete() else { continue };
        if indices.is_some() || input.datum_type != f32::datum_type() {
            continue;
        }
        // The same output as tract's operator, or left alone.
        let output = model.outlet_fact(OutletId::new(node.id, 0))?.shape.as_concrete();
        if let Some(op) = MaxPool::for_spec(spec, shape)
            && op.output_shape(shape).ok().as_deref() == output
        {
            found.push((node.id, op));
        }
    }
    for (id, op) in found {
        model.node_mut(id).op = Box::new(op);
    }
    Ok(())
}

/// Max pooling of the last two axes of a row-major f32 tensor, every window inside the image.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct MaxPool {
    kernel: [usize; 2],
    strides: [usize; 2],
}

impl MaxPool {
    /// The operator for tract's `spec` on an input of `shape`, where it applies: channels first
    /// (NCHW or CHW), two spatial axes, no dilation, and no window reaching past the image
    /// (no padding, and none added by `ceil_mode`).
    fn for_spec(spec: &tract_onnx::tract_core::ops::cnn::PoolSpec, shape: &[usize]) -> Option<MaxPool> {
        let rank = match spec.data_format {
            DataFormat::NCHW => 4,
            DataFormat::CHW => 3,
            DataFormat::NHWC | DataFormat::HWC => return None,
        };
        if shape.len() != rank || spec.kernel_shape.len() != 2 {
            return None;
        }
        if spec.dilations.as_ref().is_some_and(|d| d.iter().any(|&d| d != 1)) {
            return None;
        }
        let unpadded = match &spec.padding {
            PaddingSpec::Valid => true,
            PaddingSpec::Explicit(before, after) | PaddingSpec::ExplicitOnnxPool(before, after, false) => {
                before.iter().chain(after.iter()).all(|&p| p == 0)
            }
            _ => false,
        };
        let kernel = [spec.kernel_shape[0], spec.kernel_shape[1]];
        let strides = match &spec.strides {
            None => [1, 1],
            Some(s) if s.len() == 2 => [s[0], s[1]],
            Some(_) => return None,
        };
        let (h, w) = (shape[rank - 2], shape[rank - 1]);
        let fits = kernel[0] >= 1 && kernel[1] >= 1 && kernel[0] <= h && kernel[1] <= w;
        (unpadded && fits && strides.iter().all(|&s| s >= 1)).then_some(MaxPool { kernel, strides })
    }

    /// Output rows and columns for an image of `h` × `w`.
    fn output_hw(&self, h: usize, w: usize) -> (usize, usize) {
        ((h - self.kernel[0]) / self.strides[0] + 1, (w - self.kernel[1]) / self.strides[1] + 1)
    }

    /// The output's shape for an input of `shape`: the last two axes pooled.
    fn output_shape(&self, shape: &[usize]) -> TractResult<TVec<usize>> {
        let rank = shape.len();
        ensure!(rank >= 2, "OutpostMaxPool on a tensor of rank {rank}");
        let (h, w) = (shape[rank - 2], shape[rank - 1]);
        ensure!(self.kernel[0] <= h && self.kernel[1] <= w, "a window of {:?} past an image of {h} × {w}", self.kernel);
        let (oh, ow) = self.output_hw(h, w);
        let mut out: TVec<usize> = shape.into();
        out[rank - 2] = oh;
        out[rank - 1] = ow;
        Ok(out)
    }
}

/// Every image of `xs` (`h` × `w`, one after another) pooled into `ys`, the images split over
/// the tract pool the call runs on, as tract's own operator splits them (one thread below
/// tract's size threshold, or without a pool). Each image is pooled alone, so the values do not
/// depend on the split.
fn pool(op: &MaxPool, xs: &[f32], (h, w): (usize, usize), ys: &mut [f32]) -> TractResult<()> {
    let (oh, ow) = op.output_hw(h, w);
    par_chunks_mut(ys, oh * ow, xs.len(), |first, out| {
        let images = out.len() / (oh * ow);
        pool_images(op, &xs[first * h * w..][..images * h * w], (h, w), out);
        Ok(())
    })
}

/// [`pool`] on the calling thread. `row` holds one output row's window rows, reduced.
fn pool_images(op: &MaxPool, xs: &[f32], (h, w): (usize, usize), ys: &mut [f32]) {
    let ([kh, kw], [sh, sw]) = (op.kernel, op.strides);
    let (oh, ow) = op.output_hw(h, w);
    let mut row = vec![0f32; w];
    for (image, out) in xs.chunks_exact(h * w).zip(ys.chunks_exact_mut(oh * ow)) {
        for (oy, out_row) in out.chunks_exact_mut(ow).enumerate() {
            let top = oy * sh;
            row.copy_from_slice(&image[top * w..][..w]);
            for ky in 1..kh {
                for (r, &x) in row.iter_mut().zip(&image[(top + ky) * w..][..w]) {
                    *r = r.max(x);
                }
            }
            if kw == 2 && sw == 2 {
                for (o, pair) in out_row.iter_mut().zip(row.chunks_exact(2)) {
                    *o = f32::MIN.max(pair[0]).max(pair[1]);
                }
            } else {
                for (ox, o) in out_row.iter_mut().enumerate() {
                    *o = row[ox * sw..][..kw].iter().fold(f32::MIN, |m, &x| m.max(x));
                }
            }
        }
    }
}

impl Op for MaxPool {
    fn name(&self) -> StaticName {
        "OutpostMaxPool".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("kernel: {:?} strides: {:?}", self.kernel, self.strides)])
    }

    op_as_typed_op!();
}

impl EvalOp for MaxPool {
    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let shape = inputs[0].shape();
        let mut y = Tensor::zero::<f32>(&self.output_shape(shape)?)?;
        let hw = (shape[shape.len() - 2], shape[shape.len() - 1]);
        let input = inputs[0].try_as_plain_ram()?;
        let mut output = y.try_as_plain_ram_mut()?;
        pool(self, input.as_slice::<f32>()?, hw, output.as_slice_mut::<f32>()?)?;
        Ok(tvec!(y.into_tvalue()))
    }

    op_out_of_plan!();
}

impl TypedOp for MaxPool {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = inputs[0].shape.as_concrete().context("OutpostMaxPool needs a concrete input shape")?;
        Ok(tvec!(f32::fact(self.output_shape(shape)?)))
    }
}

#[cfg(test)]
mod tests {
    use tract_onnx::prelude::*;
    use tract_onnx::tract_core::ops::cnn::{MaxPool as TractMaxPool, PaddingSpec, PoolSpec};
    use tract_onnx::tract_core::ops::nn::DataFormat;

    use super::super::pool::Pool;
    use super::{MaxPool, replace};

    /// A plan of one tract `MaxPool` on `[n, c, h, w]`, and what it gives on `input`: tract's own
    /// operator, and after [`replace`] (with whether it replaced it).
    fn floats(t: &Tensor) -> Vec<f32> {
        t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
    }

    fn both(
        shape: [usize; 4],
        kernel: [usize; 2],
        strides: [usize; 2],
        padding: PaddingSpec,
        input: &[f32],
    ) -> (Tensor, Tensor, bool) {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(shape)).unwrap();
        let spec = PoolSpec::new(
            DataFormat::NCHW,
            kernel[..].into(),
            padding,
            None,
            Some(strides[..].into()),
            shape[1],
            shape[1],
        );
        let y = model.wire_node("pool", TractMaxPool::new(spec, None), &[x]).unwrap();
        model.select_output_outlets(&y).unwrap();
        let tract = model.clone().into_optimized().unwrap();
        let mut ours = model.into_optimized().unwrap();
        replace(&mut ours).unwrap();
        let replaced = ours.nodes().iter().any(|n| n.op_is::<MaxPool>());
        let run = |m: TypedModel| {
            let x = Tensor::from_shape(&shape, input).unwrap();
            m.into_runnable().unwrap().run(tvec!(x.into_tvalue())).unwrap().remove(0).into_tensor()
        };
        (run(tract), run(ours), replaced)
    }

    fn values(n: usize) -> Vec<f32> {
        let mut v = 0.37f32;
        (0..n)
            .map(|i| match i % 97 {
                5 => f32::NAN,
                11 => -0.0,
                13 => 0.0,
                _ => {
                    v = 3.99 * v * (1.0 - v);
                    (v - 0.5) * 10.0
                }
            })
            .collect()
    }

    #[test]
    fn pools_as_tracts_own_operator() {
        for (shape, kernel, strides) in [
            ([1, 8, 28, 28], [2, 2], [2, 2]),
            ([2, 3, 7, 9], [2, 2], [2, 2]),
            ([1, 4, 9, 11], [3, 3], [2, 2]),
            ([1, 2, 8, 8], [2, 2], [1, 1]),
            ([1, 2, 12, 10], [3, 2], [3, 2]),
            ([1, 1, 5, 6], [5, 1], [1, 3]),
        ] {
            let input = values(shape.iter().product());
            let (tract, ours, replaced) = both(shape, kernel, strides, PaddingSpec::Valid, &input);
            assert!(replaced, "{shape:?} {kernel:?} {strides:?}");
            assert_eq!(tract.shape(), ours.shape());
            let (tract, ours) = (floats(&tract), floats(&ours));
            for (i, (t, o)) in tract.iter().zip(&ours).enumerate() {
                // ±0 compare equal; tract's order of comparison may pick the other.
                assert!(t == o || t.to_bits() == o.to_bits(), "{shape:?} {kernel:?} {strides:?} at {i}: {t} vs {o}");
            }
        }
    }

    #[test]
    fn a_large_input_split_over_the_pool_pools_as_on_one_thread() {
        // 131,072 elements: past tract's threshold for splitting an element-wise operator, so
        // with the pool (the default build) the images are pooled on two threads.
        let shape = [2, 16, 64, 64];
        let input = values(shape.iter().product());
        let (tract, ours, replaced) = both(shape, [2, 2], [2, 2], PaddingSpec::Valid, &input);
        assert!(replaced);
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(shape)).unwrap();
        let y = model.wire_node("pool", MaxPool { kernel: [2, 2], strides: [2, 2] }, &[x]).unwrap();
        model.select_output_outlets(&y).unwrap();
        let plan = model.into_runnable().unwrap();
        let pool = Pool::new(2).unwrap();
        let split = pool.run(|| {
            let x = Tensor::from_shape(&shape, &input).unwrap();
            plan.run(tvec!(x.into_tvalue())).unwrap().remove(0).into_tensor()
        });
        assert_eq!(floats(&split), floats(&ours));
        let equal = floats(&tract).iter().zip(floats(&split)).all(|(t, o)| *t == o || t.to_bits() == o.to_bits());
        assert!(equal);
    }

    #[test]
    fn a_window_of_nan_alone_gives_the_lowest_float_as_tract_does() {
        let (tract, ours, _) = both(
            [1, 1, 2, 4],
            [2, 2],
            [2, 2],
            PaddingSpec::Valid,
            &[f32::NAN, f32::NAN, 1.0, f32::NAN, f32::NAN, f32::NAN, f32::NAN, -3.0],
        );
        assert_eq!(floats(&tract), floats(&ours));
        assert_eq!(floats(&ours), [f32::MIN, 1.0]);
    }

    #[test]
    fn padded_pools_stay_tracts() {
        let padding = PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1]);
        let input = values(2 * 6 * 6);
        let (tract, ours, replaced) = both([1, 2, 6, 6], [2, 2], [2, 2], padding, &input);
        assert!(!replaced);
        assert_eq!(tract, ours);
    }
}
