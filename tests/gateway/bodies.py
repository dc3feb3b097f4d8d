"""Requests the gateway's unit tests share."""
from pathlib import Path

CHAT = {"model": "llm", "messages": [{"role": "user", "content": "Hi"}]}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                         "parameters": {"type": "object", "required": ["city"],
                                                        "properties": {"city": {"type": "string"}}}}}
REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
