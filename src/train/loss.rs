//! Focal loss with class weights, from logits (numerically stable).

use candle_core::{Result, Tensor};

/// Binary focal loss settings: `alpha` weighs the fraud class, `gamma` focuses on hard examples,
/// and class weights multiply each example's loss (the notebook's {0: 1, 1: 30}).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FocalLoss {
    /// Weight of the positive term; the negative term gets `1 - alpha`.
    pub alpha: f64,
    /// Focusing exponent.
    pub gamma: f64,
    /// Extra weight of legitimate examples.
    pub weight_neg: f64,
    /// Extra weight of fraud examples.
    pub weight_pos: f64,
}

impl Default for FocalLoss {
    fn default() -> Self {
        FocalLoss {
            alpha: 0.8,
            gamma: 2.0,
            weight_neg: 1.0,
            weight_pos: 30.0,
        }
    }
}

impl FocalLoss {
    /// Mean over the batch of
    /// `-w_y · [y·α·(1-p)^γ·log p + (1-y)·(1-α)·p^γ·log(1-p)]`, with `p = sigmoid(logit)`.
    /// `targets` holds 0.0 / 1.0.
    pub fn forward(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        // log p = -softplus(-z), log(1-p) = -softplus(z); softplus(x) = relu(x) + log(1+e^-|x|).
        let softplus = |x: &Tensor| -> Result<Tensor> {
            x.relu()?.add(&(x.abs()?.neg()?.exp()? + 1.0)?.log()?)
        };
        let log_p = softplus(&logits.neg()?)?.neg()?;
        let log_q = softplus(logits)?.neg()?;
        let p = log_p.exp()?;
        let q = log_q.exp()?;
        let pos = ((q.powf(self.gamma)? * log_p)? * (self.alpha * self.weight_pos))?;
        let neg = ((p.powf(self.gamma)? * log_q)? * ((1.0 - self.alpha) * self.weight_neg))?;
        let one_minus_y = targets.affine(-1.0, 1.0)?;
        let per_example = (targets.mul(&pos)? + one_minus_y.mul(&neg)?)?.neg()?;
        per_example.mean_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_hand_computed_values() {
        // z = 0   -> p = 0.5. y=1: 30 * 0.8 * 0.25 * ln 2 = 4.158883083359672
        // z = ln 3 -> p = 0.75. y=0: 1 * 0.2 * 0.5625 * -ln(0.25) = 0.15596634733096073
        // mean = 2.157424715345316
        let logits = Tensor::new(&[0f32, 3f32.ln()], &Device::Cpu).unwrap();
        let y = Tensor::new(&[1f32, 0.0], &Device::Cpu).unwrap();
        let loss: f32 = FocalLoss::default()
            .forward(&logits, &y)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((loss - 2.157_424_7).abs() < 1e-5, "{loss}");
    }

    #[test]
    fn confident_correct_predictions_cost_almost_nothing() {
        let logits = Tensor::new(&[12f32, -12.0], &Device::Cpu).unwrap();
        let y = Tensor::new(&[1f32, 0.0], &Device::Cpu).unwrap();
        let loss: f32 = FocalLoss::default()
            .forward(&logits, &y)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((0.0..1e-8).contains(&loss), "{loss}");
    }
}
