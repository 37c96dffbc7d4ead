//! The tokenizer and chat template read from the GGUF give llama.cpp's token ids.
//! Expected ids come from llama.cpp's `llama-tokenize --ids --no-bos` (the copy vendored in
//! llama-cpp-python 0.3.36) on the same SmolLM2-135M-Instruct Q4_1 file.

mod common;

use redline_engine::model::read_gguf;
use redline_engine::tokenizer::{ChatMessage, Detokenizer, TextCodec};

fn codec() -> TextCodec {
    let (ct, _) = read_gguf(&common::model_path()).unwrap();
    TextCodec::from_gguf(&ct).unwrap()
}

#[test]
fn ids_match_llama_cpp() {
    let c = codec();
    let cases: &[(&str, &[u32])] = &[
        ("system", &[9690]),
        (
            "Hello, world! 12345 tokens.",
            &[19556, 28, 905, 17, 216, 33, 34, 35, 36, 37, 17837, 30],
        ),
        (
            "  leading spaces and tabs\there",
            &[216, 2899, 5600, 284, 29416, 197, 1531],
        ),
        (
            "Ünïcödé — emoji 🦀 and 中文",
            &[
                142, 246, 94, 25972, 83, 7466, 84, 2756, 1841, 649, 33777, 15107, 116, 218, 284,
                216, 28589, 29184,
            ],
        ),
    ];
    for (text, want) in cases {
        assert_eq!(c.encode(text).unwrap(), *want, "ids for {text:?}");
        assert_eq!(c.decode(want), *text, "round trip of {text:?}");
    }
}

#[test]
fn chat_template_from_the_file_gives_llama_cpp_ids() {
    let c = codec();
    let text = c
        .apply_chat_template(&[ChatMessage {
            role: "user".into(),
            content: "What is 2+2?".into(),
        }])
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let want: &[u32] = &[
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
        407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520,
        9531, 198,
    ];
    assert_eq!(c.encode(&text).unwrap(), want);
    assert!(c.stop_ids().contains(&2), "<|im_end|> ends a turn");
}

#[test]
fn streaming_detokenization_never_splits_a_character() {
    let c = codec();
    let text = "Ünïcödé — emoji 🦀 and 中文, then ascii.";
    let ids = c.encode(text).unwrap();
    let mut d = Detokenizer::default();
    let mut out = String::new();
    for id in ids {
        if let Some(piece) = d.push(&c, id) {
            assert!(
                !piece.contains('\u{FFFD}'),
                "piece {piece:?} holds a broken character"
            );
            out.push_str(&piece);
        }
    }
    assert_eq!(out, text);
}
