//! `DynamicQuantizeLinear` for tract, in place of tract 0.23's own: what ONNX Runtime's
//! `quantize_dynamic` puts in front of every MatMul and Conv, so it runs on every activation of a
//! dynamically quantized model.
//!
//! tract's version walks the tensor through a generic n-dimensional view and rounds each element
//! with a library call; on the OCR direction classifier it took 13 of 16 ms (docs/backends.md).
//! This one reads the tensor as one slice: the range in eight independent lanes (vectorised),
//! then each element divided, clamped and rounded half to even with the 1.5 × 2²³ addition (exact
//! for the |v| ≤ 255 left after the clamp), all of which the compiler vectorises.
//!
//! Semantics are ONNX Runtime's (its `GetQuantizationParameter` and `MlasQuantizeLinear`), which
//! the golden files come from: the range widened to hold 0; `scale = range / 255`, or 1 when the
//! range is empty (the specification leaves that case undefined and tract divides by zero);
//! `zero = round(clamp(−min / scale, 0, 255))`; `y = clamp(round(x / scale) + zero, 0, 255)`, all
//! rounding half to even. A NaN in `x` is ignored by the range and quantizes to 0.

use tract_onnx::tract_hir::internal::*;

/// The operator the rewrite writes in place of a `DynamicQuantizeLinear` whose quantized output
/// only integer products read, as their centred first operand (`super::rewrite`): its first
/// output is `y − zero` in FP32 instead of `y` in UINT8.
pub(crate) const CENTRED_OP: &str = "OutpostDynamicQuantizeCentred";

/// Replaces tract's `DynamicQuantizeLinear` in `onnx`'s operator table, and adds the centred form.
pub(crate) fn register(onnx: &mut tract_onnx::Onnx) {
    onnx.op_register.insert("DynamicQuantizeLinear", |_, _| build(Form::U8));
    onnx.op_register.insert(CENTRED_OP, |_, _| build(Form::Centred));
}

fn build(form: Form) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(DynamicQuantize(form)), vec![]))
}

/// What the first output holds.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
enum Form {
    /// `y`, as `DynamicQuantizeLinear` specifies.
    U8,
    /// `y − zero` in FP32: what a product's centred operand reads, without the UINT8 tensor, the
    /// cast back to FP32 and the subtraction. The values are the same integers.
    Centred,
}

/// The operator as the ONNX graph has it: shapes and types for tract's analysis.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct DynamicQuantize(Form);

impl Expansion for DynamicQuantize {
    fn name(&self) -> StaticName {
        match self.0 {
            Form::U8 => "DynamicQuantizeLinear".into(),
            Form::Centred => CENTRED_OP.into(),
        }
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(3)
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 3)?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].datum_type, self.0.datum_type())?;
        s.equals(&outputs[0].shape, &inputs[0].shape)?;
        s.equals(&outputs[1].datum_type, f32::datum_type())?;
        s.equals(&outputs[1].rank, 0)?;
        s.equals(&outputs[2].datum_type, u8::datum_type())?;
        s.equals(&outputs[2].rank, 0)?;
        Ok(())
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, Quantize(self.0), &[inputs[0]])
    }
}

impl Form {
    fn datum_type(self) -> DatumType {
        match self {
            Form::U8 => u8::datum_type(),
            Form::Centred => f32::datum_type(),
        }
    }
}

/// The operator in tract's plan.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Quantize(Form);

impl Op for Quantize {
    fn name(&self) -> StaticName {
        match self.0 {
            Form::U8 => "OutpostDynamicQuantizeLinearU8".into(),
            Form::Centred => CENTRED_OP.into(),
        }
    }

    op_as_typed_op!();
}

impl EvalOp for Quantize {
    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs[0].cast_to::<f32>()?;
        let xs = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let (y, (scale, zero)) = match self.0 {
            Form::U8 => {
                let mut y = Tensor::zero::<u8>(x.shape())?;
                let parameters = quantize(xs, y.try_as_plain_ram_mut()?.as_slice_mut::<u8>()?);
                (y, parameters)
            }
            Form::Centred => {
                let mut y = Tensor::zero::<f32>(x.shape())?;
                let parameters = quantize_centred(xs, y.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?);
                (y, parameters)
            }
        };
        Ok(tvec!(y.into_tvalue(), tensor0(scale).into_tvalue(), tensor0(zero).into_tvalue()))
    }

    op_out_of_plan!();
}

impl TypedOp for Quantize {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let y = self.0.datum_type().fact(inputs[0].shape.clone());
        Ok(tvec!(y, f32::scalar_fact(), u8::scalar_fact()))
    }
}

/// The scale and zero point (as a float: an integer in [0, 255], or NaN where the scale cannot
/// resolve the range: a −infinity in `xs`, or only subnormals so small that the scale is 0)
/// ONNX Runtime takes for `xs`.
fn parameters(xs: &[f32]) -> (f32, f32) {
    const LANES: usize = 8;
    let (mut low, mut high) = ([0f32; LANES], [0f32; LANES]);
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for i in 0..LANES {
            low[i] = if chunk[i] < low[i] { chunk[i] } else { low[i] };
            high[i] = if chunk[i] > high[i] { chunk[i] } else { high[i] };
        }
    }
    let (mut min, mut max) = (0f32, 0f32);
    for (&l, &h) in low.iter().zip(&high).chain(rest.iter().zip(rest)) {
        min = min.min(l);
        max = max.max(h);
    }
    let scale = if max == min { 1.0 } else { (max - min) / 255.0 };
    (scale, round_half_even((-min / scale).clamp(0.0, 255.0)))
}

/// Quantizes `xs` into `ys` (the same length); returns the scale and zero point. With a NaN zero
/// point every `y` and the zero point are 0 (`NaN as u8`), as ONNX Runtime's conversion gives.
pub(crate) fn quantize(xs: &[f32], ys: &mut [u8]) -> (f32, u8) {
    let (scale, zero) = parameters(xs);
    let (lowest, highest) = (-zero, 255.0 - zero);
    for (x, y) in xs.iter().zip(ys.iter_mut()) {
        *y = (round_half_even(clamp(x / scale, lowest, highest)) + zero) as u8;
    }
    (scale, zero as u8)
}

/// Quantizes `xs` and writes each `y − zero` into `cs` (the same length), as FP32: integers in
/// [−zero, 255 − zero], the same values `quantize` gives less the zero point, exactly (0 where
/// the zero point is NaN, as there). Returns the scale and zero point.
pub(crate) fn quantize_centred(xs: &[f32], cs: &mut [f32]) -> (f32, u8) {
    let (scale, zero) = parameters(xs);
    if zero.is_nan() {
        cs.fill(0.0);
        return (scale, 0);
    }
    let (lowest, highest) = (-zero, 255.0 - zero);
    for (x, c) in xs.iter().zip(cs.iter_mut()) {
        *c = round_half_even(clamp(x / scale, lowest, highest));
    }
    (scale, zero as u8)
}

/// `v` clamped to [lowest, highest], NaN to `lowest` (as `v.max(lowest).min(highest)` gives
/// for bounds that are not NaN; NaN bounds give NaN, which `quantize` turns into 0),
/// written as comparisons, which compile to one instruction each where `f32::max` and `min` spend
/// more on NaN.
#[inline(always)]
fn clamp(v: f32, lowest: f32, highest: f32) -> f32 {
    let v = if v > lowest { v } else { lowest };
    if v < highest { v } else { highest }
}

/// Rounds half to even, for |v| < 2²²: adding 1.5 × 2²³ leaves no fraction bits, so the FPU's
/// default rounding (to nearest, ties to even) does the rounding, and subtracting it back is exact.
fn round_half_even(v: f32) -> f32 {
    (v + ROUNDING_SHIFT) - ROUNDING_SHIFT
}

/// 1.5 × 2²³: a float this size has no fraction bits, and adding an integer below 2²² in magnitude
/// changes only its low mantissa bits.
pub(crate) const ROUNDING_SHIFT: f32 = 12_582_912.0;

#[cfg(test)]
mod tests {
    use super::{quantize, quantize_centred};

    /// The definition, one element at a time.
    fn reference(xs: &[f32]) -> (Vec<u8>, f32, u8) {
        let min = xs.iter().fold(0f32, |m, &x| m.min(x));
        let max = xs.iter().fold(0f32, |m, &x| m.max(x));
        let scale = if max == min { 1.0 } else { (max - min) / 255.0 };
        let zero = (-min / scale).clamp(0.0, 255.0).round_ties_even();
        let ys = xs.iter().map(|x| ((x / scale).round_ties_even() + zero).clamp(0.0, 255.0) as u8).collect();
        (ys, scale, zero as u8)
    }

    fn check(xs: &[f32]) {
        let mut ys = vec![0; xs.len()];
        let (scale, zero) = quantize(xs, &mut ys);
        assert_eq!((ys.clone(), scale, zero), reference(xs), "{xs:?}");
        // The centred form: the same integers less the zero point, and the same parameters.
        let mut cs = vec![f32::NAN; xs.len()];
        assert_eq!(quantize_centred(xs, &mut cs), (scale, zero), "{xs:?}");
        let expected: Vec<f32> = ys.iter().map(|&y| f32::from(y) - f32::from(zero)).collect();
        assert_eq!(cs, expected, "{xs:?}");
    }

    #[test]
    fn the_onnx_specification_examples() {
        let cases: [(&[f32], &[u8], u8); 3] = [
            (&[0., 2., -3., -2.5, 1.34, 0.5], &[153, 255, 0, 26, 221, 179], 153),
            (&[-1., -2.1, -1.3, -2.5, -3.34, -4.], &[191, 121, 172, 96, 42, 0], 255),
            (
                &[1., 2.1, 1.3, 2.5, 3.34, 4., 1.5, 2.6, 3.9, 4., 3., 2.345],
                &[64, 134, 83, 159, 213, 255, 96, 166, 249, 255, 191, 149],
                0,
            ),
        ];
        for (xs, expected, expected_zero) in cases {
            let mut ys = vec![0; xs.len()];
            let (_, zero) = quantize(xs, &mut ys);
            assert_eq!((ys.as_slice(), zero), (expected, expected_zero));
        }
    }

    #[test]
    fn agrees_with_the_definition_on_every_length_and_on_ties() {
        // Lengths around the lane width; values from a fixed pseudo-random walk.
        let mut v = 0.37f32;
        let xs: Vec<f32> = (0..1000)
            .map(|i| {
                v = (v * 3.9 * (1.0 - v.abs().min(1.0))).clamp(-1.0, 1.0);
                v * if i % 7 == 0 { -10.0 } else { 3.0 }
            })
            .collect();
        for len in [0, 1, 7, 8, 9, 15, 16, 17, 63, 1000] {
            check(&xs[..len]);
        }
        // x / scale exactly halfway between integers: [0, 255] gives scale 1, so 2.5 → 2, 3.5 → 4.
        let mut ys = [0; 5];
        quantize(&[0.0, 2.5, 3.5, 254.5, 255.0], &mut ys);
        assert_eq!(ys, [0, 2, 4, 254, 255]);
        check(&[0.0, 2.5, 3.5, 254.5, 255.0]);
        // Ranges the scale cannot resolve give a NaN zero point: every y and the zero point 0.
        check(&[1e-45, 0.0]);
        check(&[f32::NEG_INFINITY, 1.0, -2.0]);
        check(&[f32::INFINITY, 1.0, -2.0]);
        // A NaN is left out of the range and quantizes to 0.
        check(&[1.0, f32::NAN, -2.0, 0.5]);
        // An empty range: scale 1, every element 0.
        check(&[0.0; 12]);
        let mut ys = [9; 3];
        assert_eq!(quantize(&[0.0; 3], &mut ys), (1.0, 0));
        assert_eq!(ys, [0; 3]);
    }
}
