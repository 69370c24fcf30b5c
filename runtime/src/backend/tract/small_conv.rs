//! A float convolution whose reduction is tiny (one input channel and a 3×3 kernel or smaller, at
//! stride 1): the first layer of a CNN over a grayscale image or a spectrogram.
//!
//! tract 0.23 lowers such a convolution, where its output rows are shorter than 128 (longer ones
//! go to tract's own direct convolution, which splits over the pool), to a lazy im2col and a
//! matrix product. With 9 or fewer values to reduce per output, the product has almost nothing
//! to do, and gathering each panel of the im2col matrix takes the time: on the peer harness's
//! LeNet-style CNN, the first layer (8 channels of 28×28, 3×3) took 18.8 µs of the 48 µs call,
//! plus 1.4 µs for its padding (docs/benchmarks.md). [`replace`] swaps tract's `Conv` in the decluttered model, before
//! tract lowers it, for [`SmallConv`], which pads the image once and, for each output channel
//! and each tap, adds the weighted image to the output in one run the compiler vectorises: the
//! output rows are kept at the padded width, so the taps' rows are one contiguous run each.
//!
//! The values are the convolution's, summed tap by tap in the kernel's order and the bias added
//! last, as tract's product sums them; tract's kernels can fuse the multiply and the add, so the
//! two can differ in the last bits of a sum (the tests compare within 1e-6 relative).

use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::nn::DataFormat;
use tract_onnx::tract_hir::internal::*;

/// The largest reduction (input channels × kernel rows × kernel columns) [`SmallConv`] takes:
/// measured past tract's lowering at 9 (docs/benchmarks.md); at 72 tract's product is faster.
const MAX_REDUCTION: usize = 9;

/// The shortest output row left to tract: from there tract 0.23 runs its own direct convolution
/// (`DirectSpatialConv`, on AVX2 with FMA and on arm64), split over the call's pool.
const TRACTS_DIRECT_FROM_WIDTH: usize = 128;

/// Replaces each of tract's `Conv` in a decluttered model that [`SmallConv`] can run.
pub(crate) fn replace(model: &mut TypedModel) -> TractResult<()> {
    let mut found = vec![];
    for node in model.nodes() {
        let Some(conv) = node.op_as::<Conv>() else { continue };
        let facts = model.node_input_facts(node.id)?;
        let Some(shape) = facts[0].shape.as_concrete() else { continue };
        if facts[0].datum_type != f32::datum_type()
            || facts[1].datum_type != f32::datum_type()
            || facts[2].datum_type != f32::datum_type()
        {
            continue;
        }
        let kernel = facts[1].shape.as_concrete();
        if kernel.is_none_or(|k| k.first() == Some(&0)) {
            continue;
        }
        let Some(op) = SmallConv::for_conv(conv, shape) else { continue };
        // The same output as tract's operator, or left alone.
        let output = model.outlet_fact(OutletId::new(node.id, 0))?.shape.as_concrete();
        if op.output_shape(shape, kernel).ok().as_deref() == output {
            found.push((node.id, op));
        }
    }
    for (id, op) in found {
        model.node_mut(id).op = Box::new(op);
    }
    Ok(())
}

/// A stride-1 convolution over `[n, 1, h, w]` with an `[m, 1, kh, kw]` kernel and a bias of `m`
/// values (or one for all), its image padded by `pad` (top, left, bottom, right).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SmallConv {
    kernel: [usize; 2],
    pad: [usize; 4],
}

impl SmallConv {
    /// The operator for tract's `conv` on an input of `shape`, where it applies: float, channels
    /// first, two spatial axes, one group, one input channel, stride and dilation 1, a kernel of
    /// at most [`MAX_REDUCTION`] taps, a non-empty image, and output rows shorter than
    /// [`TRACTS_DIRECT_FROM_WIDTH`].
    fn for_conv(conv: &Conv, shape: &[usize]) -> Option<SmallConv> {
        let spec = &conv.pool_spec;
        if conv.q_params.is_some()
            || conv.group != 1
            || conv.kernel_fmt != KernelFormat::OIHW
            || spec.data_format != DataFormat::NCHW
            || shape.len() != 4
            || spec.kernel_shape.len() != 2
            || spec.input_channels != 1
            || spec.kernel_shape.iter().product::<usize>() > MAX_REDUCTION
            || spec.strides().iter().any(|&s| s != 1)
            || spec.dilations().iter().any(|&d| d != 1)
            || shape[2] == 0
            || shape[3] == 0
        {
            return None;
        }
        let padding = spec.computed_padding(&shape[2..]);
        let kernel = [spec.kernel_shape[0], spec.kernel_shape[1]];
        let pad = [padding[0].pad_before, padding[1].pad_before, padding[0].pad_after, padding[1].pad_after];
        let op = SmallConv { kernel, pad };
        let (ph, pw) = op.padded_hw(shape[2], shape[3]);
        let fits = kernel[0] >= 1 && kernel[1] >= 1 && kernel[0] <= ph && kernel[1] <= pw;
        (fits && pw - kernel[1] + 1 < TRACTS_DIRECT_FROM_WIDTH).then_some(op)
    }

    fn padded_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (h + self.pad[0] + self.pad[2], w + self.pad[1] + self.pad[3])
    }

    /// `[n, m, oh, ow]` for an input of `shape` and a kernel of `kernel` (its shape, where known).
    fn output_shape(&self, shape: &[usize], kernel: Option<&[usize]>) -> TractResult<TVec<usize>> {
        ensure!(shape.len() == 4 && shape[1] == 1, "OutpostSmallConv on an input of {shape:?}");
        let kernel = kernel.context("OutpostSmallConv needs a kernel of known shape")?;
        ensure!(
            kernel.len() == 4 && kernel[1] == 1 && kernel[2..] == self.kernel,
            "OutpostSmallConv with a kernel of {kernel:?}"
        );
        let (ph, pw) = self.padded_hw(shape[2], shape[3]);
        ensure!(
            self.kernel[0] <= ph && self.kernel[1] <= pw,
            "a kernel of {:?} past an image of {ph} × {pw}",
            self.kernel
        );
        Ok(tvec![shape[0], kernel[0], ph - self.kernel[0] + 1, pw - self.kernel[1] + 1])
    }

    /// Every image of `xs` (`h` × `w`) convolved with `weights` (`m` kernels) into `ys`.
    fn run(&self, xs: &[f32], (h, w): (usize, usize), weights: &[f32], bias: &[f32], ys: &mut [f32]) {
        let [kh, kw] = self.kernel;
        let taps = kh * kw;
        let m = weights.len() / taps;
        let (ph, pw) = self.padded_hw(h, w);
        let (oh, ow) = (ph - kh + 1, pw - kw + 1);
        // The output at the padded width: the tap (ky, kx) reads the run starting at ky·pw + kx.
        let run = (oh - 1) * pw + ow;
        let mut padded = vec![0f32; ph * pw];
        let mut wide = vec![0f32; run];
        for (image, out) in xs.chunks_exact(h * w).zip(ys.chunks_exact_mut(m * oh * ow)) {
            for (y, row) in image.chunks_exact(w).enumerate() {
                padded[(y + self.pad[0]) * pw + self.pad[1]..][..w].copy_from_slice(row);
            }
            for (o, plane) in out.chunks_exact_mut(oh * ow).enumerate() {
                wide.fill(0.0);
                for (tap, &weight) in weights[o * taps..][..taps].iter().enumerate() {
                    let src = &padded[(tap / kw) * pw + tap % kw..][..run];
                    for (acc, &x) in wide.iter_mut().zip(src) {
                        *acc += weight * x;
                    }
                }
                let b = if bias.len() == 1 { bias[0] } else { bias[o] };
                for (out_row, acc_row) in plane.chunks_exact_mut(ow).zip(wide.chunks(pw)) {
                    for (y, &acc) in out_row.iter_mut().zip(acc_row) {
                        *y = acc + b;
                    }
                }
            }
        }
    }
}

impl Op for SmallConv {
    fn name(&self) -> StaticName {
        "OutpostSmallConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("kernel: {:?} pad: {:?}", self.kernel, self.pad)])
    }

    op_as_typed_op!();
}

impl EvalOp for SmallConv {
    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, kernel, bias) = (&inputs[0], &inputs[1], &inputs[2]);
        let shape = x.shape();
        let out_shape = self.output_shape(shape, Some(kernel.shape()))?;
        ensure!(
            bias.len() == 1 || bias.len() == out_shape[1],
            "a bias of {:?} for {} channels",
            bias.shape(),
            out_shape[1]
        );
        let mut y = Tensor::zero::<f32>(&out_shape)?;
        let (xs, ws, bs) = (x.try_as_plain_ram()?, kernel.try_as_plain_ram()?, bias.try_as_plain_ram()?);
        let mut ys = y.try_as_plain_ram_mut()?;
        let hw = (shape[2], shape[3]);
        self.run(xs.as_slice::<f32>()?, hw, ws.as_slice::<f32>()?, bs.as_slice::<f32>()?, ys.as_slice_mut::<f32>()?);
        Ok(tvec!(y.into_tvalue()))
    }

    op_out_of_plan!();
}

impl TypedOp for SmallConv {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = inputs[0].shape.as_concrete().context("OutpostSmallConv needs a concrete input shape")?;
        Ok(tvec!(f32::fact(self.output_shape(shape, inputs[1].shape.as_concrete())?)))
    }
}

#[cfg(test)]
mod tests {
    use tract_onnx::prelude::*;
    use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
    use tract_onnx::tract_core::ops::nn::DataFormat;

    use super::{SmallConv, replace};

    struct Case {
        input: [usize; 4],
        kernel: [usize; 4],
        padding: PaddingSpec,
        strides: [usize; 2],
        bias_per_channel: bool,
    }

    fn case(input: [usize; 4], kernel: [usize; 4], padding: PaddingSpec) -> Case {
        Case { input, kernel, padding, strides: [1, 1], bias_per_channel: true }
    }

    fn values(n: usize, seed: f32) -> Vec<f32> {
        let mut v = seed;
        (0..n)
            .map(|_| {
                v = 3.99 * v * (1.0 - v);
                (v - 0.5) * 4.0
            })
            .collect()
    }

    fn floats(t: &Tensor) -> Vec<f32> {
        t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
    }

    /// A plan of one tract `Conv`, and what it gives: tract's own lowering, and after [`replace`]
    /// (with whether it replaced it).
    fn both(c: &Case) -> (Tensor, Tensor, bool) {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(c.input)).unwrap();
        let k = Tensor::from_shape(&c.kernel, &values(c.kernel.iter().product(), 0.29)).unwrap();
        let k = model.add_const("k", k).unwrap();
        let b = if c.bias_per_channel {
            Tensor::from_shape(&[c.kernel[0]], &values(c.kernel[0], 0.61)).unwrap()
        } else {
            tensor0(0.25f32)
        };
        let b = model.add_const("b", b).unwrap();
        let spec = PoolSpec::new(
            DataFormat::NCHW,
            c.kernel[2..].into(),
            c.padding.clone(),
            None,
            Some(c.strides[..].into()),
            c.kernel[1],
            c.kernel[0],
        );
        let conv = Conv { pool_spec: spec, kernel_fmt: KernelFormat::OIHW, group: 1, q_params: None };
        let y = model.wire_node("conv", conv, &[x, k, b]).unwrap();
        model.select_output_outlets(&y).unwrap();
        let tract = model.clone().into_optimized().unwrap();
        let mut ours = model.into_decluttered().unwrap();
        replace(&mut ours).unwrap();
        let ours = ours.into_optimized().unwrap();
        let replaced = ours.nodes().iter().any(|n| n.op_is::<SmallConv>());
        let run = |m: TypedModel| {
            let x = Tensor::from_shape(&c.input, &values(c.input.iter().product(), 0.37)).unwrap();
            m.into_runnable().unwrap().run(tvec!(x.into_tvalue())).unwrap().remove(0).into_tensor()
        };
        (run(tract), run(ours), replaced)
    }

    #[test]
    fn convolves_as_tracts_own_lowering() {
        let explicit = |t, l, b, r| PaddingSpec::Explicit(tvec![t, l], tvec![b, r]);
        for c in [
            case([1, 1, 28, 28], [8, 1, 3, 3], explicit(1, 1, 1, 1)),
            case([2, 1, 8, 8], [4, 1, 3, 3], PaddingSpec::SameUpper),
            case([1, 1, 9, 7], [3, 1, 3, 3], PaddingSpec::Valid),
            case([1, 1, 6, 10], [5, 1, 2, 2], PaddingSpec::SameLower),
            case([1, 1, 5, 12], [1, 1, 1, 3], explicit(0, 2, 0, 0)),
            case([3, 1, 7, 4], [2, 1, 3, 1], explicit(2, 0, 1, 0)),
            case([1, 1, 3, 3], [6, 1, 3, 3], PaddingSpec::Valid),
            Case { bias_per_channel: false, ..case([1, 1, 10, 10], [3, 1, 3, 3], explicit(1, 1, 1, 1)) },
        ] {
            let (tract, ours, replaced) = both(&c);
            let what = format!("{:?} {:?} {:?}", c.input, c.kernel, c.padding);
            assert!(replaced, "{what}");
            assert_eq!(tract.shape(), ours.shape(), "{what}");
            for (i, (t, o)) in floats(&tract).iter().zip(floats(&ours)).enumerate() {
                // tract's kernels fuse the multiply and the add; a sum may differ in its last bits.
                assert!((t - o).abs() <= 1e-6 * (1.0 + t.abs()), "{what} at {i}: {t} vs {o}");
            }
        }
    }

    #[test]
    fn other_convolutions_stay_tracts() {
        for c in [
            // Three input channels: a reduction of 27.
            case([1, 3, 8, 8], [4, 3, 3, 3], PaddingSpec::Valid),
            // A 5×5 kernel: 25 taps.
            case([1, 1, 12, 12], [2, 1, 5, 5], PaddingSpec::Valid),
            // Stride 2.
            Case { strides: [2, 2], ..case([1, 1, 9, 9], [2, 1, 3, 3], PaddingSpec::Valid) },
            // Output rows of 128: tract's own direct convolution's, where the machine has it.
            case([1, 1, 4, 130], [2, 1, 3, 3], PaddingSpec::Valid),
        ] {
            let (tract, ours, replaced) = both(&c);
            assert!(!replaced, "{:?} {:?}", c.input, c.kernel);
            assert_eq!(floats(&tract), floats(&ours));
        }
        // The widest output row it takes: 127.
        assert!(both(&case([1, 1, 4, 129], [2, 1, 3, 3], PaddingSpec::Valid)).2);
    }

    #[test]
    fn an_empty_image_stays_tracts() {
        // Padding alone would give this image an output (the bias): the operator's runs assume
        // at least one pixel.
        let spec = PoolSpec::new(
            DataFormat::NCHW,
            tvec![1, 3],
            PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1]),
            None,
            None,
            1,
            4,
        );
        let conv = Conv { pool_spec: spec, kernel_fmt: KernelFormat::OIHW, group: 1, q_params: None };
        assert_eq!(SmallConv::for_conv(&conv, &[1, 1, 0, 5]), None);
        assert_eq!(SmallConv::for_conv(&conv, &[1, 1, 5, 0]), None);
        assert!(SmallConv::for_conv(&conv, &[1, 1, 1, 5]).is_some());
    }
}
