//! Chat templates: the model's own `tokenizer.chat_template` rendered with a Jinja engine
//! configured as Hugging Face's `apply_chat_template` does (`trim_blocks`, `lstrip_blocks`,
//! `raise_exception`, Python string methods), with built-in fallbacks for models that ship none.

use crate::{Error, ErrorKind};
use minijinja::{Environment, ErrorKind as JinjaErrorKind, Value};
use serde::{Deserialize, Serialize};

/// One chat message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.to_owned(),
            content: content.to_owned(),
        }
    }
}

/// Gemma's turn format, used when a gemma-family GGUF has no template (as the registry's
/// Gemma-3 file does). Mirrors the template Google publishes: system text is folded into the
/// first user turn, and the assistant role is called `model`.
const GEMMA_FALLBACK: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

/// ChatML, the generic fallback for models without a template.
const CHATML_FALLBACK: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from: `gguf`, `fallback:gemma` or `fallback:chatml`.
    pub source: &'static str,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source` (a Jinja chat template).
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, Error> {
        Self::build(source.to_owned(), "gguf", bos_token, eos_token)
    }

    /// The template of a GGUF model (`tokenizer.chat_template`, else the fallback for its
    /// architecture), with its BOS/EOS token texts.
    pub fn from_gguf(
        f: &ruvllm_gguf::GgufFile,
        tok: &crate::Tokenizer,
    ) -> Result<ChatTemplate, Error> {
        let name = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_owned();
        let tmpl = f.get("tokenizer.chat_template").and_then(|v| v.as_str());
        let arch = f
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        Self::for_model(tmpl, arch, &name(tok.bos), &name(tok.eos))
    }

    /// The template to use for a model: its own if it has one, else a fallback chosen by
    /// architecture (Gemma's turn format for gemma*, ChatML otherwise).
    pub fn for_model(
        template: Option<&str>,
        arch: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate, Error> {
        match template {
            Some(t) => Self::new(t, bos_token, eos_token),
            None if arch.starts_with("gemma") => Self::build(
                GEMMA_FALLBACK.to_owned(),
                "fallback:gemma",
                bos_token,
                eos_token,
            ),
            None => Self::build(
                CHATML_FALLBACK.to_owned(),
                "fallback:chatml",
                bos_token,
                eos_token,
            ),
        }
    }

    fn build(
        source: String,
        origin: &'static str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate, Error> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(JinjaErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source)
            .map_err(|e| Error::new(ErrorKind::Template(format!("cannot parse: {e}"))))?;
        Ok(ChatTemplate {
            env,
            source: origin,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// Renders `messages`; `add_generation_prompt` appends the assistant turn's header.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::new(ErrorKind::Template(e.to_string())))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| Error::new(ErrorKind::Template(format!("cannot render: {e}"))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_exception_is_an_error_not_a_panic() {
        let t = ChatTemplate::new(
            "{% if messages|length == 0 %}{{ raise_exception('no messages') }}{% endif %}ok",
            "",
            "",
        )
        .unwrap();
        let e = t.render(&[], true).unwrap_err();
        assert!(e.to_string().contains("no messages"), "{e}");
        assert_eq!(
            t.render(&[ChatMessage::new("user", "x")], true).unwrap(),
            "ok"
        );
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new(
            "{{ messages[0]['content'].strip() }}|{{ messages[0].role.upper() }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("user", "  hi ")], false)
                .unwrap(),
            "hi|USER"
        );
    }

    #[test]
    fn gemma_fallback_folds_system_into_first_turn() {
        let t = ChatTemplate::for_model(None, "gemma3", "<bos>", "<eos>").unwrap();
        let s = t
            .render(
                &[
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("user", "Hi"),
                    ChatMessage::new("assistant", "Hello"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(s, "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n<start_of_turn>model\n");
        assert_eq!(t.source, "fallback:gemma");
    }

    #[test]
    fn broken_template_is_a_typed_error() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", "", "").unwrap_err().kind(),
            ErrorKind::Template(_)
        ));
    }
}
