//! Rotary position embeddings as transformers computes them: the RoPE settings of a
//! `config.json` in either format, and the inverse frequencies and attention factor of each
//! `rope_type` this crate supports.
//!
//! | `rope_type` | fields read | as in transformers |
//! |---|---|---|
//! | `default` | `rope_theta` | `_compute_default_rope_parameters` |
//! | `linear` | `factor` | `_compute_linear_scaling_rope_parameters` |
//! | `llama3` | `factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings` | `_compute_llama3_parameters` |
//! | `yarn` | `factor`, `original_max_position_embeddings`, `beta_fast`, `beta_slow`, `attention_factor`, `mscale`, `mscale_all_dim`, `truncate` | `_compute_yarn_parameters` |
//!
//! Other types (`dynamic`, `longrope`, …), per-layer-type RoPE settings, a
//! `partial_rotary_factor` other than 1 and any key not listed are rejected with
//! [`LisaError::UnsupportedConfig`]: a loader must not compute a different model than the
//! checkpoint's. Frequencies are computed in f32, as transformers computes them.

use serde_json::{Map, Value};

use crate::error::{LisaError, Result};

/// The RoPE base when a config gives none.
pub const DEFAULT_ROPE_THETA: f64 = 10_000.0;

/// How the inverse frequencies are scaled (transformers' `rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor`.
    Linear {
        /// The scaling factor.
        factor: f64,
    },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        /// The scaling factor.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length of pre-training.
        original_max_position_embeddings: f64,
    },
    /// YaRN (Qwen's long-context setting): a ramp between interpolated and extrapolated
    /// frequencies, and cos/sin scaled by an attention factor.
    Yarn {
        /// The scaling factor.
        factor: f64,
        /// The context length of pre-training.
        original_max_position_embeddings: f64,
        /// Rotations where the ramp starts (32 by default).
        beta_fast: f64,
        /// Rotations where the ramp ends (1 by default).
        beta_slow: f64,
        /// The cos/sin scale; from `mscale`/`mscale_all_dim` or `0.1 ln(factor) + 1` when
        /// absent.
        attention_factor: f64,
        /// Whether the ramp's ends are rounded to whole dimensions (true by default).
        truncate: bool,
    },
}

/// The RoPE of one model: base, per-head width and scaling.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    /// The base θ.
    pub theta: f64,
    /// The rotated width (the head width).
    pub dim: usize,
    /// The scaling.
    pub scaling: RopeScaling,
}

fn unsupported(field: &'static str, value: String, hint: &'static str) -> LisaError {
    LisaError::UnsupportedConfig { field, value, hint }
}

fn invalid(msg: String) -> LisaError {
    LisaError::InvalidConfig(msg)
}

const KNOWN_KEYS: [&str; 14] = [
    "rope_theta",
    "rope_type",
    "type",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "attention_factor",
    "mscale",
    "mscale_all_dim",
    "truncate",
    "partial_rotary_factor",
];

impl Rope {
    /// The RoPE a config describes.
    ///
    /// `rope_parameters` is transformers 5's object (it holds `rope_theta`); `rope_scaling`
    /// and `rope_theta` are transformers 4's top-level fields. When both formats give θ they
    /// must agree. For `llama3` and `yarn`, `original_max_position_embeddings` is the
    /// top-level field when the config has one (Phi-3 writes it there), else the one in the
    /// RoPE object, else `max_position_embeddings`, as transformers resolves it.
    ///
    /// # Errors
    /// [`LisaError::UnsupportedConfig`] naming the field for a RoPE this crate does not
    /// compute; [`LisaError::InvalidConfig`] for missing or invalid values.
    pub fn from_fields(
        rope_parameters: Option<&Value>,
        rope_scaling: Option<&Value>,
        rope_theta: Option<f64>,
        dim: usize,
        max_position_embeddings: usize,
        top_level_original_max: Option<f64>,
    ) -> Result<Self> {
        let object =
            |v: Option<&Value>, field: &'static str| -> Result<Option<Map<String, Value>>> {
                match v {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::Object(m)) => Ok(Some(m.clone())),
                    Some(other) => Err(invalid(format!("{field} must be an object, not {other}"))),
                }
            };
        let (params, field) = match (
            object(rope_parameters, "rope_parameters")?,
            object(rope_scaling, "rope_scaling")?,
        ) {
            (Some(p), _) => (p, "rope_parameters"),
            (None, Some(s)) => (s, "rope_scaling"),
            (None, None) => (Map::new(), "rope_parameters"),
        };
        if params.values().any(Value::is_object) {
            return Err(unsupported(
                "rope_parameters",
                Value::Object(params).to_string(),
                "per-layer-type RoPE settings (Gemma 3) are not supported",
            ));
        }
        if let Some(key) = params.keys().find(|k| !KNOWN_KEYS.contains(&k.as_str())) {
            return Err(unsupported(
                "rope_parameters",
                key.clone(),
                "this RoPE setting is not computed by candle-lisa",
            ));
        }
        let number = |key: &str| -> Result<Option<f64>> {
            match params.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .map(Some)
                    .ok_or_else(|| {
                        invalid(format!("{field}.{key} must be a finite number, not {v}"))
                    }),
            }
        };
        let required = |key: &str, kind: &str| -> Result<f64> {
            number(key)?
                .ok_or_else(|| invalid(format!("{field}.{key} is required for rope_type {kind}")))
        };
        let theta = match (number("rope_theta")?, rope_theta) {
            (Some(a), Some(b)) if a != b => {
                return Err(invalid(format!(
                    "rope_theta is {b} but {field}.rope_theta is {a}; remove one"
                )))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => DEFAULT_ROPE_THETA,
        };
        if !(theta.is_finite() && theta > 0.0) {
            return Err(invalid(format!(
                "rope_theta {theta} must be finite and positive"
            )));
        }
        if let Some(p) = number("partial_rotary_factor")?.filter(|&p| p != 1.0) {
            return Err(unsupported(
                "partial_rotary_factor",
                p.to_string(),
                "only RoPE over the whole head (1.0) is supported",
            ));
        }
        let kind = match params.get("rope_type").or_else(|| params.get("type")) {
            None | Some(Value::Null) => "default".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(invalid(format!(
                    "{field}.rope_type must be a string, not {other}"
                )))
            }
        };
        let original = top_level_original_max
            .or(number("original_max_position_embeddings")?)
            .unwrap_or(max_position_embeddings as f64);
        let positive = |key: &str, x: f64| -> Result<f64> {
            match x > 0.0 {
                true => Ok(x),
                false => Err(invalid(format!("{field}.{key} must be positive, not {x}"))),
            }
        };
        let scaling = match kind.as_str() {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: positive("factor", required("factor", "linear")?)?,
            },
            "llama3" => {
                let s = RopeScaling::Llama3 {
                    factor: positive("factor", required("factor", "llama3")?)?,
                    low_freq_factor: positive(
                        "low_freq_factor",
                        required("low_freq_factor", "llama3")?,
                    )?,
                    high_freq_factor: positive(
                        "high_freq_factor",
                        required("high_freq_factor", "llama3")?,
                    )?,
                    original_max_position_embeddings: positive(
                        "original_max_position_embeddings",
                        original,
                    )?,
                };
                if let RopeScaling::Llama3 {
                    low_freq_factor,
                    high_freq_factor,
                    ..
                } = s
                {
                    if high_freq_factor <= low_freq_factor {
                        return Err(invalid(format!(
                            "{field}.high_freq_factor ({high_freq_factor}) must exceed low_freq_factor ({low_freq_factor})"
                        )));
                    }
                }
                s
            }
            "yarn" => {
                let factor = number("factor")?.unwrap_or(max_position_embeddings as f64 / original);
                let factor = positive("factor", factor)?;
                let get_mscale = |scale: f64, mscale: f64| match scale <= 1.0 {
                    true => 1.0,
                    false => 0.1 * mscale * scale.ln() + 1.0,
                };
                let attention_factor = match (
                    number("attention_factor")?,
                    number("mscale")?,
                    number("mscale_all_dim")?,
                ) {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                        get_mscale(factor, m) / get_mscale(factor, all)
                    }
                    _ => get_mscale(factor, 1.0),
                };
                let truncate = match params.get("truncate") {
                    None | Some(Value::Null) => true,
                    Some(Value::Bool(b)) => *b,
                    Some(other) => {
                        return Err(invalid(format!(
                            "{field}.truncate must be a boolean, not {other}"
                        )))
                    }
                };
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: positive(
                        "original_max_position_embeddings",
                        original,
                    )?,
                    beta_fast: number("beta_fast")?.unwrap_or(32.0),
                    beta_slow: number("beta_slow")?.unwrap_or(1.0),
                    attention_factor,
                    truncate,
                }
            }
            other => {
                return Err(unsupported(
                    "rope_type",
                    other.to_string(),
                    "default, linear, llama3 and yarn are supported",
                ))
            }
        };
        Ok(Self {
            theta,
            dim,
            scaling,
        })
    }

    /// The `dim / 2` inverse frequencies, in f32 as transformers computes them.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.dim;
        // transformers: base ** (arange(0, dim, 2).float() / dim), in f32.
        let pos_freqs: Vec<f32> = (0..d / 2)
            .map(|i| (self.theta as f32).powf((2 * i) as f32 / d as f32))
            .collect();
        let plain: Vec<f32> = pos_freqs.iter().map(|p| 1.0 / p).collect();
        match self.scaling {
            RopeScaling::Default => plain,
            RopeScaling::Linear { factor } => plain.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let (factor, low, high, old) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                    old as f32,
                );
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                plain
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        if wavelen < high_wavelen || wavelen > low_wavelen {
                            scaled
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                let (base, dim) = (self.theta, d as f64);
                let correction_dim = |rotations: f64| {
                    dim * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                let (low, high) = (low as f32, high as f32);
                plain
                    .iter()
                    .zip(&pos_freqs)
                    .enumerate()
                    .map(|(i, (&extrapolation, &p))| {
                        let interpolation = 1.0 / (factor as f32 * p);
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        interpolation * (1.0 - extrapolation_factor)
                            + extrapolation * extrapolation_factor
                    })
                    .collect()
            }
        }
    }

    /// The factor cos and sin are multiplied by (YaRN's attention factor; 1 otherwise).
    pub fn attention_factor(&self) -> f64 {
        match self.scaling {
            RopeScaling::Yarn {
                attention_factor, ..
            } => attention_factor,
            _ => 1.0,
        }
    }
}
