//! The evaluation chat template (spec §2.2) and `<image>` splitting (spec §2.3).

use alloc::string::String;
use alloc::vec::Vec;

use crate::error::Result;
use crate::models::qwen2_5_vl::IMAGE_PLACEHOLDER;

pub const SYSTEM_PROMPT: &str =
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
pub const IMAGE_TAG: &str = "<image>";

/// The prompt string for one user turn with `n_images` images (spec §2.2): the question is
/// prefixed with `"<image> <image> …\n"` unless it already contains `<image>` tags.
pub fn chat_prompt(question: &str, n_images: usize) -> String {
    let mut user = String::new();
    if n_images > 0 && !question.contains(IMAGE_TAG) {
        for i in 0..n_images {
            if i > 0 {
                user.push(' ');
            }
            user.push_str(IMAGE_TAG);
        }
        user.push('\n');
    }
    user.push_str(question);
    let mut s = String::new();
    s.push_str("<|im_start|>system\n");
    s.push_str(SYSTEM_PROMPT);
    s.push_str("<|im_end|>\n<|im_start|>user\n");
    s.push_str(&user);
    s.push_str("<|im_end|>\n<|im_start|>assistant\n");
    s
}

/// Split on `<image>`, tokenise each chunk on its own, join with the placeholder id
/// (spec §2.3: `\n` is never merged across an image boundary).
pub fn tokenize_with_images(
    prompt: &str,
    mut encode: impl FnMut(&str) -> Result<Vec<u32>>,
) -> Result<Vec<i64>> {
    let mut ids = Vec::new();
    for (i, chunk) in prompt.split(IMAGE_TAG).enumerate() {
        if i > 0 {
            ids.push(IMAGE_PLACEHOLDER);
        }
        if !chunk.is_empty() {
            ids.extend(encode(chunk)?.into_iter().map(i64::from));
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_matches_spec() {
        assert_eq!(
            chat_prompt("What is two plus two?", 0),
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(chat_prompt("Describe.", 2).contains("user\n<image> <image>\nDescribe.<|im_end|>"));
        assert!(chat_prompt("Compare <image> and <image>", 2)
            .contains("user\nCompare <image> and <image><|im_end|>"));
    }

    #[test]
    fn chunks_are_tokenised_separately() {
        let mut seen = Vec::new();
        let ids = tokenize_with_images("a<image>b<image>", |c| {
            seen.push(String::from(c));
            Ok(alloc::vec![c.len() as u32])
        })
        .unwrap();
        assert_eq!(seen, ["a", "b"]);
        assert_eq!(ids, alloc::vec![1, IMAGE_PLACEHOLDER, 1, IMAGE_PLACEHOLDER]);
    }
}
