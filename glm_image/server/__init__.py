"""The HTTP server (`glm-image serve`): the bigmodel and OpenAI image APIs over one engine worker."""
