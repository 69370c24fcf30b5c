//! `QuantizeLinear` with one scale and zero point for the whole tensor, as tract's plans run it:
//! what a statically quantized (QDQ) model puts after every Conv, MatMul, Add and pooling, each
//! followed by the `DequantizeLinear` that turns it back into floats for the next operator.
//!
//! tract 0.23's own operator reaches each element through its generic element-wise wrapper and
//! converts it to an integer one at a time; on the OCR direction classifier's QDQ form it took
//! 60% of the call (perf, docs/backends.md). tract's simplifications look for that operator (a
//! DequantizeLinear → MaxPool → QuantizeLinear chain run on the integers, or folded into a table),
//! so it stays in place while tract optimises the model, and [`vectorise`] then replaces it in
//! the finished plan:
//! - by [`Quantize`], the same arithmetic written so that the compiler vectorises it;
//! - where a `DequantizeLinear` reads it back, by [`RoundTrip`] in place of that
//!   `DequantizeLinear`: the float the pair would give, in one pass, with no integer tensor
//!   between.
//!
//! The arithmetic is tract's own, bit for bit: x times the reciprocal of the scale that tract
//! computed at import, rounded half to even, plus the zero point, saturated; a NaN gives the zero
//! point. Dequantized: (q − zero point) × scale. One difference: beyond 2³¹ quantization steps
//! tract's integer sum overflows (to the wrong end of the range, in a release build), where this
//! saturates, as the ONNX specification says.

use tract_onnx::tract_core::ops::change_axes::{AxisOp, IntoShape};
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::quant::{DequantizeLinearF32, QuantizeLinearI8, QuantizeLinearU8};
use tract_onnx::tract_hir::internal::*;

use super::quantize::ROUNDING_SHIFT;

/// Replaces tract's per-tensor `QuantizeLinear` of f32 in an optimised plan by [`Quantize`], and
/// each `DequantizeLinear` with the same zero point that reads it (directly, or through operators
/// that only reshape) by [`RoundTrip`] on its input, followed by the same reshaping. A
/// `QuantizeLinear` left with no reader is no longer run.
pub(crate) fn vectorise(model: &mut TypedModel) -> TractResult<()> {
    let mut quantizers = vec![];
    for node in model.nodes() {
        let Some(ElementWiseOp(op, None)) = node.op_as::<ElementWiseOp>() else { continue };
        if model.outlet_fact(node.inputs[0])?.datum_type != f32::datum_type() {
            continue;
        }
        let grid = if let Some(q) = op.downcast_ref::<QuantizeLinearU8>() {
            Grid { inverse_scale: q.scale, zero_point: q.zero_point.into(), to: u8::datum_type() }
        } else if let Some(q) = op.downcast_ref::<QuantizeLinearI8>() {
            Grid { inverse_scale: q.scale, zero_point: q.zero_point.into(), to: i8::datum_type() }
        } else {
            continue;
        };
        quantizers.push((node.id, grid));
    }
    let mut round_trips = vec![];
    for &(id, grid) in &quantizers {
        let mut readers = vec![];
        dequantizers(model, id, grid.zero_point, &mut vec![], &mut readers);
        round_trips.extend(readers.into_iter().map(|(reshapes, dq, scale)| (id, grid, reshapes, dq, scale)));
    }
    for (id, grid) in quantizers {
        model.node_mut(id).op = Box::new(Quantize(grid));
    }
    for (quantizer, grid, reshapes, dq, scale) in round_trips {
        let name = &model.node(dq).name;
        let mut patch = TypedModelPatch::default();
        // Read now: an earlier round trip may have replaced what the quantizer reads. (The
        // quantizer itself is removed only once its last reader is replaced.)
        let input = *model.node(quantizer).inputs.first().context("a quantizer removed before its readers")?;
        let mut wire = patch.tap_model(model, input)?;
        wire = patch.wire_node(format!("{name}.round_trip"), RoundTrip { grid, scale }, &[wire])?[0];
        for id in reshapes {
            let reshape = model.node(id);
            wire = patch.wire_node(format!("{name}.{}", reshape.name), reshape.op.clone(), &[wire])?[0];
        }
        patch.shunt_outside(model, OutletId::new(dq, 0), wire)?;
        patch.apply(model)?;
    }
    Ok(())
}

/// The `DequantizeLinear` nodes with `zero_point` that read node `id`'s output, directly or
/// through reshaping operators (`path`, in order): each with its path and scale.
fn dequantizers(
    model: &TypedModel,
    id: usize,
    zero_point: i16,
    path: &mut Vec<usize>,
    found: &mut Vec<(Vec<usize>, usize, f32)>,
) {
    for inlet in &model.node(id).outputs[0].successors {
        let reader = model.node(inlet.node);
        if let Some(dq) = reader.op_as::<DequantizeLinearF32>() {
            if dq.zero_point == i32::from(zero_point) {
                found.push((path.clone(), reader.id, dq.scale));
            }
        } else if reader.op_is::<IntoShape>() || reader.op_is::<AxisOp>() {
            path.push(reader.id);
            dequantizers(model, reader.id, zero_point, path, found);
            path.pop();
        }
    }
}

/// The integers a tensor is quantized to, and how.
#[derive(Debug, Clone, Copy)]
struct Grid {
    /// What tract multiplies by: the reciprocal of the model's scale.
    inverse_scale: f32,
    zero_point: i16,
    /// `u8` or `i8`.
    to: DatumType,
}

impl Grid {
    /// The quantized values' bounds less the zero point.
    fn steps(&self) -> (f32, f32) {
        let (lowest, highest) = if self.to == u8::datum_type() { (0.0, 255.0) } else { (-128.0, 127.0) };
        (lowest - f32::from(self.zero_point), highest - f32::from(self.zero_point))
    }

    /// The same bits: an equivalence even for a NaN scale.
    fn key(&self) -> (u32, i16, DatumType) {
        (self.inverse_scale.to_bits(), self.zero_point, self.to)
    }
}

/// `x × inverse_scale`, NaN as 0, clamped to `steps` (integers: clamping before rounding gives
/// what clamping after would), then 1.5 × 2²³ added, which rounds it half to even: the integer
/// is the sum's low bits, and subtracting 1.5 × 2²³ again gives it as a float.
#[inline(always)]
fn shifted(x: f32, inverse_scale: f32, (lowest, highest): (f32, f32)) -> f32 {
    let v = x * inverse_scale;
    let v = if v.is_nan() { 0.0 } else { v };
    // Comparisons rather than `f32::max` and `min`, which spend instructions on NaN, gone here.
    let v = if v > lowest { v } else { lowest };
    let v = if v < highest { v } else { highest };
    v + ROUNDING_SHIFT
}

/// `QuantizeLinear`: f32 to `u8` or `i8`.
#[derive(Debug, Clone)]
struct Quantize(Grid);

/// `DequantizeLinear(QuantizeLinear(x))` in one operator: f32 to f32.
#[derive(Debug, Clone)]
struct RoundTrip {
    grid: Grid,
    /// The `DequantizeLinear`'s scale.
    scale: f32,
}

impl PartialEq for Quantize {
    fn eq(&self, other: &Quantize) -> bool {
        self.0.key() == other.0.key()
    }
}

impl Eq for Quantize {}

impl PartialEq for RoundTrip {
    fn eq(&self, other: &RoundTrip) -> bool {
        (self.grid.key(), self.scale.to_bits()) == (other.grid.key(), other.scale.to_bits())
    }
}

impl Eq for RoundTrip {}

impl Op for Quantize {
    fn name(&self) -> StaticName {
        "OutpostQuantizeLinear".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}", self.0)])
    }

    op_as_typed_op!();
}

impl Op for RoundTrip {
    fn name(&self) -> StaticName {
        "OutpostQuantizeDequantize".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?} scale: {}", self.grid, self.scale)])
    }

    op_as_typed_op!();
}

impl EvalOp for Quantize {
    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = inputs[0].try_as_plain_ram()?;
        let xs = input.as_slice::<f32>()?;
        let mut y = Tensor::zero_dt(self.0.to, inputs[0].shape())?;
        let mut output = y.try_as_plain_ram_mut()?;
        if self.0.to == u8::datum_type() {
            quantize(xs, output.as_slice_mut::<u8>()?, self.0);
        } else {
            quantize(xs, output.as_slice_mut::<i8>()?, self.0);
        }
        Ok(tvec!(y.into_tvalue()))
    }

    op_out_of_plan!();
}

impl EvalOp for RoundTrip {
    /// In place where the plan hands over the only reference to the input (the usual case: the
    /// operator before wrote it for this one alone), so the floats are read and written once.
    fn eval(&self, _: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut x = inputs.remove(0).into_tensor();
        round_trip(x.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?, self.grid, self.scale);
        Ok(tvec!(x.into_tvalue()))
    }

    op_out_of_plan!();
}

impl TypedOp for Quantize {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.0.to.fact(inputs[0].shape.clone())))
    }
}

impl TypedOp for RoundTrip {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }
}

/// Integer types a tensor is quantized to.
trait Quantized: Copy {
    /// The integer in the low bits of `bits`.
    fn from_low_bits(bits: u32) -> Self;
}

impl Quantized for u8 {
    fn from_low_bits(bits: u32) -> u8 {
        bits as u8
    }
}

impl Quantized for i8 {
    fn from_low_bits(bits: u32) -> i8 {
        bits as i8
    }
}

/// `ys[i] = saturate(round_half_even(xs[i] × inverse_scale) + zero_point)`, NaN giving the zero
/// point. The integer is read from the float's bits, not converted: the compiler does not
/// vectorise the conversion.
fn quantize<T: Quantized>(xs: &[f32], ys: &mut [T], grid: Grid) {
    let (steps, zero) = (grid.steps(), f32::from(grid.zero_point));
    for (x, y) in xs.iter().zip(ys.iter_mut()) {
        // Adding the zero point to the shifted, rounded value is exact.
        *y = T::from_low_bits((shifted(*x, grid.inverse_scale, steps) + zero).to_bits());
    }
}

/// `x = (quantize(x) − zero_point) × scale` for each x.
fn round_trip(xs: &mut [f32], grid: Grid, scale: f32) {
    let steps = grid.steps();
    for x in xs {
        *x = (shifted(*x, grid.inverse_scale, steps) - ROUNDING_SHIFT) * scale;
    }
}

#[cfg(test)]
mod tests {
    use tract_onnx::prelude::{Datum, DatumType};
    use tract_onnx::tract_core::ops::quant::{quantize_linear_f32_i8, quantize_linear_f32_u8};

    use super::{Grid, quantize, round_trip};

    /// Values around every rounding case: ties at both signs, the saturation bounds, and beyond
    /// (not so far beyond that tract's integer sum overflows: see the module's documentation).
    fn values() -> Vec<f32> {
        let mut xs: Vec<f32> = (-1200..=1200).map(|i| i as f32 * 0.25).collect();
        xs.extend([f32::NAN, -0.0, 1e-30, 8.4e6, -8.4e6, 2e7, -2e7]);
        let mut v = 0.37f32;
        xs.extend((0..997).map(|_| {
            v = 3.99 * v * (1.0 - v);
            (v - 0.5) * 700.0
        }));
        xs
    }

    const INVERSE_SCALES: [f32; 5] = [1.0, 0.5, 3.0, 1.0 / 0.0123, 1.0 / 7.7];

    fn grid(inverse_scale: f32, zero_point: i16, to: DatumType) -> Grid {
        Grid { inverse_scale, zero_point, to }
    }

    #[test]
    fn quantizes_as_tracts_own_operator_bit_for_bit() {
        let xs = values();
        for inverse_scale in INVERSE_SCALES {
            for zero_point in [0u8, 1, 128, 200, 255] {
                let mut ys = vec![0u8; xs.len()];
                quantize(&xs, &mut ys, grid(inverse_scale, zero_point.into(), u8::datum_type()));
                for (x, y) in xs.iter().zip(&ys) {
                    let tract = quantize_linear_f32_u8(*x, inverse_scale, zero_point.into());
                    assert_eq!(*y, tract, "{x} × {inverse_scale} + {zero_point}");
                }
            }
            for zero_point in [-128i8, -3, 0, 5, 127] {
                let mut ys = vec![0i8; xs.len()];
                quantize(&xs, &mut ys, grid(inverse_scale, zero_point.into(), i8::datum_type()));
                for (x, y) in xs.iter().zip(&ys) {
                    let tract = quantize_linear_f32_i8(*x, inverse_scale, zero_point.into());
                    assert_eq!(*y, tract, "{x} × {inverse_scale} + {zero_point}");
                }
            }
        }
    }

    #[test]
    fn a_round_trip_is_tracts_quantize_then_dequantize_bit_for_bit() {
        let xs = values();
        for inverse_scale in INVERSE_SCALES {
            let scale = 1.0 / inverse_scale;
            for zero_point in [0u8, 128, 255] {
                let mut ys = xs.clone();
                round_trip(&mut ys, grid(inverse_scale, zero_point.into(), u8::datum_type()), scale);
                for (x, y) in xs.iter().zip(&ys) {
                    let q = quantize_linear_f32_u8(*x, inverse_scale, zero_point.into());
                    let tract = (i32::from(q) - i32::from(zero_point)) as f32 * scale;
                    assert_eq!(y.to_bits(), tract.to_bits(), "{x} × {inverse_scale} + {zero_point}: {y} vs {tract}");
                }
            }
            for zero_point in [-128i8, 0, 127] {
                let mut ys = xs.clone();
                round_trip(&mut ys, grid(inverse_scale, zero_point.into(), i8::datum_type()), scale);
                for (x, y) in xs.iter().zip(&ys) {
                    let q = quantize_linear_f32_i8(*x, inverse_scale, zero_point.into());
                    let tract = (i32::from(q) - i32::from(zero_point)) as f32 * scale;
                    assert_eq!(y.to_bits(), tract.to_bits(), "{x} × {inverse_scale} + {zero_point}: {y} vs {tract}");
                }
            }
        }
    }

    #[test]
    fn ties_round_to_even_and_bounds_saturate() {
        let xs = [0.5, 1.5, 2.5, -0.5, 300.0, -300.0, f32::NAN, f32::MAX, f32::NEG_INFINITY];
        let mut ys = [0u8; 9];
        quantize(&xs, &mut ys, grid(1.0, 10, u8::datum_type()));
        assert_eq!(ys, [10, 12, 12, 10, 255, 0, 10, 255, 0]);
        let mut ys = [0i8; 9];
        quantize(&xs, &mut ys, grid(1.0, -10, i8::datum_type()));
        assert_eq!(ys, [-10, -8, -8, -10, 127, -128, -10, 127, -128]);
        let mut ys = xs;
        round_trip(&mut ys, grid(1.0, 10, u8::datum_type()), 0.5);
        assert_eq!(ys, [0.0, 1.0, 1.0, 0.0, 122.5, -5.0, 0.0, 122.5, -5.0]);
    }
}
