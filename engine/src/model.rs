//! Loading a GGUF model once per process, its fingerprint, tokenizer and chat template.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use exo_kvcache::ModelFingerprint;
use exo_sampling::{Constraint, FinishReason, SamplingParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llguidance::Matcher;
use sha2::{Digest, Sha256};

use crate::constraint::Compiler;
use crate::error::EngineError;
use crate::offload::{self, GpuLayers, Offload};
use crate::template::{ChatTemplate, TEMPLATE_KEY};
use crate::text::TextStream;

/// llama.cpp allows one backend per process; every model shares it.
static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

pub(crate) fn backend() -> Result<&'static LlamaBackend, EngineError> {
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            #[cfg(feature = "dynamic-backends")]
            load_backend_modules();
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::Backend(e.clone()))
}

/// Loads ggml's backend modules (builds with loadable backends, feature `dynamic-backends`), once,
/// before the backend starts: from `EXO_BACKENDS_DIR` when set, else from the running binary's
/// folder when the modules were shipped beside it (`libggml-cpu*.so` there), else from the folder
/// the build installed them in. A module that cannot load (the CUDA one on a machine without the
/// CUDA libraries) is skipped by ggml; the CPU module picked is the best variant this CPU runs.
#[cfg(feature = "dynamic-backends")]
fn load_backend_modules() {
    use std::path::PathBuf;
    let beside_binary = || {
        let dir = std::env::current_exe().ok()?.parent()?.to_path_buf();
        let has_modules = std::fs::read_dir(&dir).ok()?.flatten().any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("libggml-cpu") && n.contains(".so"))
        });
        has_modules.then_some(dir)
    };
    let dir = std::env::var_os("EXO_BACKENDS_DIR")
        .map(PathBuf::from)
        .or_else(beside_binary);
    // llama-cpp-2 panics on a path that is not UTF-8 or holds a NUL: check before handing it over.
    match dir.filter(|d| d.to_str().is_some_and(|s| !s.contains('\0'))) {
        Some(dir) => {
            tracing::info!(dir = %dir.display(), "loading ggml backend modules");
            llama_cpp_2::llama_backend::load_backends_from_path(&dir);
        }
        None => llama_cpp_2::llama_backend::load_backends(),
    }
}

/// How a model is loaded.
#[derive(Debug, Clone, Default)]
pub struct ModelOptions {
    /// Layers to offload to a GPU (default: all when a GPU is present, else none).
    pub gpu_layers: GpuLayers,
    /// Run on this GPU only (llama.cpp's device index); `None`: every GPU present.
    pub main_gpu: Option<usize>,
}

/// One chat turn for the model's chat template.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text of the turn.
    pub content: String,
    /// An assistant turn's tool calls (OpenAI's `tool_calls` array).
    pub tool_calls: Option<serde_json::Value>,
    /// A tool turn's `tool_call_id`.
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A plain turn: `role` saying `content`.
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
            tool_calls: None,
            tool_call_id: None,
        }
    }
}

/// Architectures whose per-sequence state holds a cache the KV hand-off does not parse: llama.cpp's
/// sparse-attention hybrids write an indexer cache after the recurrent section, and DeepSeek 4
/// keeps a cache of its own layout. Refused when the model loads, with their names.
const UNSHIPPED_ARCHITECTURES: [&str; 3] = ["qwen4exp", "glm5-next", "deepseek4"];

/// What a model keeps per sequence, by llama.cpp's own classification of its architecture; the
/// state a context exports has these parts ([`exo_kvcache::StateShape`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    /// An attention (KV) cache: transformers.
    Attention,
    /// An attention cache and a recurrent state: hybrids (Jamba, LFM2, Granite 4 hybrid, ...).
    Hybrid,
    /// A recurrent state alone: Mamba, RWKV.
    Recurrent,
}

impl Memory {
    /// Whether the state holds an attention cache and whether it holds a recurrent section.
    pub fn parts(self) -> (bool, bool) {
        match self {
            Memory::Attention => (true, false),
            Memory::Hybrid => (true, true),
            Memory::Recurrent => (false, true),
        }
    }
}

/// A loaded model, shared by every context that runs it.
pub struct Model {
    pub(crate) llama: LlamaModel,
    path: PathBuf,
    fingerprint: ModelFingerprint,
    /// Built on the first constrained request (it walks the whole vocabulary).
    constraints: OnceLock<Result<Compiler, String>>,
    offload: Offload,
    /// The chat template from the GGUF metadata, compiled on first use.
    template: OnceLock<Result<ChatTemplate, String>>,
    /// The attention window of an interleaved sliding-window model, from its metadata.
    sliding_window: Option<u32>,
    memory: Memory,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.path)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// Output token 0, decided once, where it was sampled: its text, and whether the request ends
/// with it. The context that continues the request primes its own text stream with the same token
/// (and sends nothing for it), so the text is neither lost nor sent twice across a hand-off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstOutput {
    /// Text that became final with the token (a stop string and what follows it are cut).
    pub text: String,
    /// Set when the request ends with this token.
    pub finish: Option<FinishReason>,
}

impl Model {
    /// What output token `token` says after the request's earlier output `history` (empty for
    /// output token 0; a resumed request's tokens otherwise, whose text was already sent), and
    /// whether it ends a request sampled with `sampling`: an end token (no text), a stop string,
    /// or `max_tokens` reached.
    pub fn first_output(
        &self,
        history: &[i32],
        token: i32,
        sampling: &SamplingParams,
    ) -> FirstOutput {
        let mut stream = self.text_after(history.iter().copied(), sampling);
        let mut text = stream.push(&self.token_bytes(token));
        let finish = if self.is_eog(token) {
            text.clear();
            Some(FinishReason::Stop)
        } else if stream.stopped() {
            Some(stream.stop_reason())
        } else if sampling.max_tokens as usize <= history.len() + 1 {
            text += &stream.finish();
            Some(FinishReason::Length)
        } else {
            None
        };
        FirstOutput { text, finish }
    }

    /// The text stream of a request sampled with `sampling` after its output `sent`, whose text
    /// already went to the client: only the state is kept (text held back for a possible stop
    /// string, a character split between tokens), so the same tokens never send text twice.
    pub fn text_after(
        &self,
        sent: impl IntoIterator<Item = i32>,
        sampling: &SamplingParams,
    ) -> TextStream {
        let mut stream = TextStream::new(&sampling.stop);
        for t in sent {
            let _ = stream.push(&self.token_bytes(t));
        }
        stream
    }

    /// Loads a GGUF file and computes its fingerprint.
    pub fn load(path: &Path, options: &ModelOptions) -> Result<Arc<Model>, EngineError> {
        let load_err = |detail: String| EngineError::ModelLoad {
            path: path.display().to_string(),
            detail,
        };
        if !path.is_file() {
            return Err(load_err("no such file".into()));
        }
        let fingerprint = fingerprint_file(path).map_err(|e| load_err(e.to_string()))?;
        let backend = backend()?;
        let (params, devices, requested) = offload::params(options.gpu_layers, options.main_gpu)?;
        let llama = LlamaModel::load_from_file(backend, path, &params).map_err(|e| {
            load_err(format!(
                "llama.cpp could not load it ({e}): not a GGUF file, a truncated one, or an \
                 architecture this llama.cpp does not know (its log line above says which)"
            ))
        })?;
        let architecture = llama
            .meta_val_str("general.architecture")
            .unwrap_or_else(|_| "unknown".into());
        if UNSHIPPED_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(load_err(format!(
                "architecture {architecture} keeps a per-sequence cache of its own kind (an \
                 indexer cache, or DeepSeek 4's), which exo-router cannot check or ship between \
                 nodes: use another model (docs/models.md)"
            )));
        }
        let memory = if llama.is_recurrent() {
            Memory::Recurrent
        } else if llama.is_hybrid() {
            Memory::Hybrid
        } else {
            Memory::Attention
        };
        let sliding_window = llama
            .meta_val_str(&format!("{architecture}.attention.sliding_window"))
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|&w| w > 0);
        let n_layer = llama.n_layer();
        let offload = Offload {
            gpu_layers: if devices.is_empty() {
                0
            } else {
                requested.min(n_layer)
            },
            n_layer,
            devices,
        };
        tracing::info!(
            path = %path.display(),
            %fingerprint,
            n_layer,
            gpu_layers = offload.gpu_layers,
            gpus = offload.devices.len(),
            architecture,
            sliding_window,
            ?memory,
            "model loaded"
        );
        Ok(Arc::new(Model {
            offload,
            llama,
            path: path.to_path_buf(),
            fingerprint,
            constraints: OnceLock::new(),
            template: OnceLock::new(),
            sliding_window,
            memory,
        }))
    }

    /// What the model keeps per sequence: an attention cache, a recurrent state, or both.
    pub fn memory(&self) -> Memory {
        self.memory
    }

    /// The attention window of a sliding-window model (its metadata's
    /// `<architecture>.attention.sliding_window`): the most cells its window cache holds for a
    /// sequence. `None` for a model without one.
    pub fn sliding_window(&self) -> Option<u32> {
        self.sliding_window
    }

    /// Where the model runs: layers on a GPU and the GPUs it may use.
    pub fn offload(&self) -> &Offload {
        &self.offload
    }

    /// The model's identity on the wire.
    pub fn fingerprint(&self) -> ModelFingerprint {
        self.fingerprint
    }

    /// The file the model came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The name clients use for this model: the file name without `.gguf`.
    pub fn name(&self) -> String {
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    }

    /// Vocabulary size; valid token ids are `0..n_vocab`.
    pub fn n_vocab(&self) -> i32 {
        self.llama.n_vocab()
    }

    /// Context length the model was trained with.
    pub fn n_ctx_train(&self) -> u32 {
        self.llama.n_ctx_train()
    }

    /// Transformer layers.
    pub fn n_layer(&self) -> u32 {
        self.llama.n_layer()
    }

    /// Exactly `n` tokens of varied, plausible text (a weather log), for measurements and
    /// benchmarks; each `variant` gives a different prompt of the same length.
    pub fn filler_tokens(&self, n: usize, variant: usize) -> Vec<i32> {
        let mut text = format!("Log {variant}. Continue this weather log for many more days.\n");
        let mut day = variant * 7;
        loop {
            for _ in 0..32 {
                text += &format!(
                    "Day {day}: station {} logged {} mm of rain, wind {} km/h. ",
                    day % 17,
                    (day * 37) % 101,
                    (day * 13) % 59
                );
                day += 1;
            }
            let tokens = self.tokenize(&text, true);
            if tokens.len() >= n {
                return tokens[..n].to_vec();
            }
        }
    }

    /// Tokenizes text; `add_special` adds the start token where the model's vocabulary asks for one.
    /// Special-token text (e.g. `<|im_start|>`) is parsed as special tokens, as chat templates need.
    pub fn tokenize(&self, text: &str, add_special: bool) -> Vec<i32> {
        let toks = self
            .llama
            .vocab()
            .tokenize(text.as_bytes(), add_special, true);
        toks.into_iter().map(|t| t.0).collect()
    }

    /// The bytes a token stands for (a token may end in the middle of a UTF-8 character).
    pub fn token_bytes(&self, token: i32) -> Vec<u8> {
        self.llama
            .vocab()
            .token_to_piece(LlamaToken(token), false, None)
    }

    /// True for end-of-generation tokens (EOS, EOT, `<|im_end|>` ...).
    pub fn is_eog(&self, token: i32) -> bool {
        self.llama.vocab().is_eog(LlamaToken(token))
    }

    /// Renders chat messages (and OpenAI's `tools` array) with the model's own Jinja chat template,
    /// ending with the assistant's turn opened.
    pub fn chat_prompt(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<String, EngineError> {
        self.chat_template()?.render(messages, tools)
    }

    fn chat_template(&self) -> Result<&ChatTemplate, EngineError> {
        self.template
            .get_or_init(|| self.load_template())
            .as_ref()
            .map_err(|e| EngineError::Prompt(e.clone()))
    }

    /// The tokens of a chat request: the template's own markers are special tokens, while the
    /// messages' text is plain text, as OpenAI tokenizes it: a user who writes `<|im_start|>`
    /// gets those characters, not a role marker. A message whose special-token text the template
    /// rewrote (so it cannot be found in the rendered prompt) is refused rather than guessed at.
    pub fn chat_tokens(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<i32>, EngineError> {
        let (text, parts) = self.chat_template()?.render_parts(messages, tools)?;
        let mut plain = Vec::new();
        let mut cursor = 0;
        for part in parts.iter().filter(|p| self.has_special_text(p)) {
            let at = text
                .get(cursor..)
                .and_then(|rest| rest.find(part.as_str()))
                .ok_or_else(|| {
                    EngineError::InvalidRequest(
                        "a message holds special-token text (such as `<|im_start|>`) that the chat template rewrites, so it cannot be kept as plain text; remove it".into(),
                    )
                })?;
            plain.push(cursor + at..cursor + at + part.len());
            cursor += at + part.len();
        }
        let vocab = self.llama.vocab();
        let tokens = |text: &str, first: bool, special: bool| {
            vocab
                .tokenize(text.as_bytes(), first, special)
                .into_iter()
                .map(|t| t.0)
        };
        let mut out = Vec::new();
        let mut at = 0;
        for span in plain {
            out.extend(tokens(&text[at..span.start], at == 0, true));
            out.extend(tokens(&text[span.clone()], false, false));
            at = span.end;
        }
        out.extend(tokens(&text[at..], at == 0, true));
        Ok(out)
    }

    /// The tokens of a raw text prompt (`/v1/completions`): the start token where the vocabulary
    /// asks for one, then the text as plain text (special-token text is not parsed).
    pub fn text_tokens(&self, text: &str) -> Vec<i32> {
        let toks = self.llama.vocab().tokenize(text.as_bytes(), true, false);
        toks.into_iter().map(|t| t.0).collect()
    }

    /// True when `text` holds characters the tokenizer would read as a special token.
    fn has_special_text(&self, text: &str) -> bool {
        let vocab = self.llama.vocab();
        vocab.tokenize(text.as_bytes(), false, true)
            != vocab.tokenize(text.as_bytes(), false, false)
    }

    /// The chat template's Jinja source, if the model has one (the node reads its tool-call
    /// convention from it).
    pub fn chat_template_source(&self) -> Option<String> {
        self.llama.meta_val_str(TEMPLATE_KEY).ok()
    }

    fn load_template(&self) -> Result<ChatTemplate, String> {
        let source = self
            .llama
            .meta_val_str(TEMPLATE_KEY)
            .map_err(|e| format!("the model has no `{TEMPLATE_KEY}`: {e}"))?;
        let special = |t: LlamaToken| {
            String::from_utf8_lossy(&self.llama.vocab().token_to_piece(t, true, None)).into_owned()
        };
        let vocab = self.llama.vocab();
        ChatTemplate::new(source, special(vocab.bos()), special(vocab.eos()))
    }

    /// A fresh matcher enforcing `c` on this model's tokens; an error names what cannot be enforced.
    pub(crate) fn matcher(&self, c: &Constraint) -> Result<Matcher, EngineError> {
        self.constraints
            .get_or_init(|| Compiler::new(&self.llama))
            .as_ref()
            .map_err(|e| EngineError::Backend(format!("constrained decoding unavailable: {e}")))?
            .matcher(c)
    }

    /// Checks that `c` can be enforced on this model (compiles it once and drops the result).
    pub fn check_constraint(&self, c: &Constraint) -> Result<(), EngineError> {
        self.matcher(c).map(drop)
    }

    /// Checks that every token `logit_bias` names is in the vocabulary.
    pub fn check_bias(&self, sampling: &SamplingParams) -> Result<(), EngineError> {
        let ids: Vec<i32> = sampling.logit_bias.iter().map(|&(t, _)| t).collect();
        self.check_tokens(&ids)
    }

    /// Checks that every token id is in the vocabulary (llama.cpp must never see one that is not).
    pub fn check_tokens(&self, tokens: &[i32]) -> Result<(), EngineError> {
        let n = self.n_vocab();
        match tokens.iter().find(|&&t| t < 0 || t >= n) {
            Some(t) => Err(EngineError::InvalidRequest(format!(
                "token id {t} is outside the vocabulary 0..{n}"
            ))),
            None => Ok(()),
        }
    }
}

/// Bytes hashed from the start of the file (GGUF metadata and tensor descriptions live there).
const FINGERPRINT_HEAD: u64 = 16 << 20;
/// Evenly spaced samples of tensor data, so fine-tunes with identical metadata still differ.
const FINGERPRINT_SAMPLES: u64 = 32;
const FINGERPRINT_SAMPLE_LEN: u64 = 64 << 10;

/// A model file's fingerprint: SHA-256 over the file length, its first 16 MiB, 32 evenly spaced
/// 64 KiB samples and its last 64 KiB. Reads about 18 MiB whatever the model's size.
pub fn fingerprint_file(path: &Path) -> std::io::Result<ModelFingerprint> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut h = Sha256::new();
    h.update(b"exo-router model fingerprint v1");
    h.update(len.to_le_bytes());
    let mut buf = Vec::new();
    let mut read_at = |f: &mut File, off: u64, n: u64, h: &mut Sha256| -> std::io::Result<()> {
        let n = n.min(len.saturating_sub(off));
        buf.resize(n as usize, 0);
        f.seek(SeekFrom::Start(off))?;
        f.read_exact(&mut buf)?;
        h.update(&buf);
        Ok(())
    };
    read_at(&mut f, 0, FINGERPRINT_HEAD, &mut h)?;
    if len > FINGERPRINT_HEAD {
        let span = len - FINGERPRINT_HEAD;
        for i in 0..FINGERPRINT_SAMPLES {
            read_at(
                &mut f,
                FINGERPRINT_HEAD + span * i / FINGERPRINT_SAMPLES,
                FINGERPRINT_SAMPLE_LEN,
                &mut h,
            )?;
        }
        read_at(
            &mut f,
            len.saturating_sub(FINGERPRINT_SAMPLE_LEN),
            FINGERPRINT_SAMPLE_LEN,
            &mut h,
        )?;
    }
    Ok(ModelFingerprint(h.finalize().into()))
}
