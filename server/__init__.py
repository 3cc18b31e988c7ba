"""FastAPI service for text-encoder-free classification with a PromptKD bundle. Never imports torch."""
