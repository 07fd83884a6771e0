"""The critic: what it is asked, how its answers are read, and how it is called.

`labels`, `prompt`, `parse` and `rules` are pure (no database, HTTP client or torch);
`rules_server` serves the rules critic over the OpenAI chat-completions API. Import modules,
not names: `from app.critic import prompt`.
"""
