//! The KV layout and model identity a receiver must share with the sender.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::KvError;
use crate::transpose::transposable_elem_size;

/// A KV cache element type, with the numeric id ggml uses for it (`ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvType {
    /// 32-bit float.
    F32,
    /// 16-bit float (llama.cpp's default).
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit blocks of 32 (34 bytes a block): half the bytes of f16.
    Q8_0,
    /// 4-bit blocks of 32.
    Q4_0,
    /// 4-bit blocks of 32 with a minimum.
    Q4_1,
    /// 5-bit blocks of 32.
    Q5_0,
    /// 5-bit blocks of 32 with a minimum.
    Q5_1,
}

impl KvType {
    /// Every supported type, for help texts and tests.
    pub const ALL: [KvType; 8] = [
        KvType::F32,
        KvType::F16,
        KvType::Bf16,
        KvType::Q8_0,
        KvType::Q4_0,
        KvType::Q4_1,
        KvType::Q5_0,
        KvType::Q5_1,
    ];

    /// The `ggml_type` id of this type.
    pub fn ggml_id(self) -> u32 {
        match self {
            KvType::F32 => 0,
            KvType::F16 => 1,
            KvType::Q4_0 => 2,
            KvType::Q4_1 => 3,
            KvType::Q5_0 => 6,
            KvType::Q5_1 => 7,
            KvType::Q8_0 => 8,
            KvType::Bf16 => 30,
        }
    }

    /// The type with this `ggml_type` id.
    pub fn from_ggml_id(id: u32) -> Result<Self, KvError> {
        KvType::ALL
            .into_iter()
            .find(|t| t.ggml_id() == id)
            .ok_or(KvError::UnknownKvType(id))
    }

    /// The name used in configuration files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Bf16 => "bf16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
            KvType::Q4_1 => "q4_1",
            KvType::Q5_0 => "q5_0",
            KvType::Q5_1 => "q5_1",
        }
    }
}

impl fmt::Display for KvType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvType {
    type Err = KvError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KvType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| KvError::UnknownKvTypeName(s.to_string()))
    }
}

/// How a context lays out its KV cache; sender and receiver must agree on the parts that change the bytes.
///
/// `type_k` and `type_v` must match exactly. `flash_attn` (which decides whether V is stored transposed)
/// may differ when V has a fixed element size (f32, f16, bf16): the receiver transposes V on import.
/// `kv_unified` and `n_seq_max` may differ: the receiver re-frames the state into its own stream count.
/// `n_ctx_seq` is the per-sequence context; the receiver needs room for the cached tokens and more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvLayout {
    /// Element type of the K cache.
    pub type_k: KvType,
    /// Element type of the V cache.
    pub type_v: KvType,
    /// Flash attention on (V not transposed) or off (V transposed); always set explicitly, never "auto".
    pub flash_attn: bool,
    /// One KV stream shared by all sequences (true) or one stream per sequence slot (false).
    pub kv_unified: bool,
    /// Number of sequence slots in the context.
    pub n_seq_max: u32,
    /// Context length available to each sequence.
    pub n_ctx_seq: u32,
}

impl Default for KvLayout {
    fn default() -> Self {
        KvLayout {
            type_k: KvType::F16,
            type_v: KvType::F16,
            flash_attn: false,
            kv_unified: false,
            n_seq_max: 1,
            n_ctx_seq: 4096,
        }
    }
}

impl KvLayout {
    /// Checks that a cache exported under `sender` imports into a context with this layout.
    pub fn accepts(&self, sender: &KvLayout) -> Result<(), KvError> {
        if sender.type_k != self.type_k {
            return Err(KvError::type_mismatch("type_k", sender.type_k, self.type_k));
        }
        if sender.type_v != self.type_v {
            return Err(KvError::type_mismatch("type_v", sender.type_v, self.type_v));
        }
        // Flash attention decides whether V is stored transposed; the receiver translates V
        // element by element (`StateShape::match_v_layout`), which only types with a fixed
        // element size allow.
        if sender.flash_attn != self.flash_attn
            && transposable_elem_size(self.type_v.ggml_id() as i32).is_none()
        {
            return Err(KvError::layout(
                "flash_attn",
                sender.flash_attn,
                self.flash_attn,
            ));
        }
        Ok(())
    }

    /// Total context size llama.cpp must be given so that each sequence gets `n_ctx_seq`.
    pub fn n_ctx_total(&self) -> u64 {
        if self.kv_unified {
            u64::from(self.n_ctx_seq)
        } else {
            u64::from(self.n_ctx_seq) * u64::from(self.n_seq_max)
        }
    }
}

/// A 32-byte identity of a model file: equal fingerprints mean the same weights and quantization.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelFingerprint(pub [u8; 32]);

impl ModelFingerprint {
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for ModelFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelFingerprint({})", self.to_hex())
    }
}

impl fmt::Display for ModelFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_type_ids_and_names_round_trip() {
        for t in KvType::ALL {
            assert_eq!(KvType::from_ggml_id(t.ggml_id()), Ok(t));
            assert_eq!(t.name().parse::<KvType>(), Ok(t));
        }
        assert_eq!(KvType::from_ggml_id(99), Err(KvError::UnknownKvType(99)));
        assert!("f8".parse::<KvType>().is_err());
    }

    #[test]
    fn layout_accepts_other_stream_counts_and_translatable_v_but_not_other_types() {
        let recv = KvLayout {
            n_seq_max: 8,
            ..KvLayout::default()
        };
        let send = KvLayout {
            n_seq_max: 1,
            kv_unified: true,
            ..KvLayout::default()
        };
        assert_eq!(recv.accepts(&send), Ok(()));
        let q8 = KvLayout {
            type_v: KvType::Q8_0,
            ..send
        };
        assert!(matches!(
            recv.accepts(&q8),
            Err(KvError::LayoutMismatch {
                field: "type_v",
                ..
            })
        ));
        // f16 V translates between flash attention on and off; quantized V cannot be transposed.
        let fa = KvLayout {
            flash_attn: true,
            ..send
        };
        assert_eq!(recv.accepts(&fa), Ok(()));
        let q8_recv = KvLayout {
            type_k: KvType::Q8_0,
            type_v: KvType::Q8_0,
            flash_attn: false,
            ..recv
        };
        let q8_fa = KvLayout {
            type_k: KvType::Q8_0,
            type_v: KvType::Q8_0,
            flash_attn: true,
            ..send
        };
        assert!(matches!(
            q8_recv.accepts(&q8_fa),
            Err(KvError::LayoutMismatch {
                field: "flash_attn",
                ..
            })
        ));
    }
}
