//! Text in and out: the BPE tokenizer and the chat template, both read from the GGUF file.
//!
//! candle builds a `tokenizers::Tokenizer` from GGUF metadata but does not know the
//! `pre = smollm` pre-tokenizer and falls back to one that adds a leading space, giving wrong
//! ids. For `smollm` we install what its tokenizer.json declares: split digits one by one,
//! then byte-level without a prefix space (ids then match llama.cpp's exactly).

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use serde::Serialize;
use tokenizers::pre_tokenizers::{
    byte_level::ByteLevel, digits::Digits, sequence::Sequence, PreTokenizerWrapper,
};
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Clone)]
pub struct TextCodec {
    tok: Tokenizer,
    chat_template: Option<String>,
    bos: Option<String>,
    eos: Option<String>,
    /// Tokens that end generation: EOS and the template's end-of-turn marker.
    stop_ids: Vec<u32>,
}

fn meta_str(ct: &gguf_file::Content, key: &str) -> Option<String> {
    ct.metadata.get(key)?.to_string().ok().cloned()
}

fn meta_u32(ct: &gguf_file::Content, key: &str) -> Option<u32> {
    ct.metadata.get(key)?.to_u32().ok()
}

impl TextCodec {
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self, TextError> {
        let mut tok = Tokenizer::from_gguf(ct).map_err(|e| TextError::Tokenizer(e.to_string()))?;
        if meta_str(ct, "tokenizer.ggml.pre").as_deref() == Some("smollm") {
            let pre = Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            ]);
            tok.with_pre_tokenizer(Some(pre));
        }
        let tokens = ct
            .metadata
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .cloned()
            .unwrap_or_default();
        let name = |id: Option<u32>| -> Option<String> {
            tokens.get(id? as usize)?.to_string().ok().cloned()
        };
        let bos = name(meta_u32(ct, "tokenizer.ggml.bos_token_id"));
        let eos_id = meta_u32(ct, "tokenizer.ggml.eos_token_id");
        let eos = name(eos_id);
        let mut stop_ids: Vec<u32> = eos_id.into_iter().collect();
        for marker in ["<|im_end|>", "<|eot_id|>", "<|end|>", "</s>"] {
            if let Some(id) = tok.token_to_id(marker) {
                if !stop_ids.contains(&id) {
                    stop_ids.push(id);
                }
            }
        }
        Ok(Self {
            tok,
            chat_template: meta_str(ct, "tokenizer.chat_template"),
            bos,
            eos,
            stop_ids,
        })
    }

    /// Encodes text; special-token markers written in the text (`<|im_start|>`) become their
    /// single ids, as the chat template needs.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TextError> {
        let enc = self
            .tok
            .encode(text, false)
            .map_err(|e| TextError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.tok.decode(ids, true).unwrap_or_default()
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// Renders the model's own chat template (Jinja, via minijinja with Python-compatible
    /// string methods), ending with the assistant prompt.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String, TextError> {
        let src = self
            .chat_template
            .as_deref()
            .ok_or_else(|| TextError::Template("the model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", src)
            .map_err(|e| TextError::Template(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| TextError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos.clone().unwrap_or_default(),
            eos_token => self.eos.clone().unwrap_or_default(),
        })
        .map_err(|e| TextError::Template(e.to_string()))
    }
}

/// Turns a growing token sequence into text pieces without ever splitting a UTF-8 character:
/// a piece is released only when the decoded text no longer ends in a replacement character
/// (an incomplete multi-byte sequence waiting for its next token).
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    pub fn push(&mut self, codec: &TextCodec, id: u32) -> Option<String> {
        self.ids.push(id);
        let prefix = codec.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = codec.decode(&self.ids[self.prefix_offset..]);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let piece = match full.get(prefix.len()..) {
                Some(p) if full.starts_with(&prefix) => p.to_string(),
                _ => full.chars().skip(prefix.chars().count()).collect(),
            };
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Some(piece)
        } else {
            None
        }
    }
}
