"""The benchmarks' workloads: chat questions of mixed length, a long system prompt, and a mixed workload."""
from __future__ import annotations

import random

QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about autumn leaves.",
    "How do I reverse a list in Python?",
    "Give me three tips for a good night's sleep.",
    "What is the difference between a virus and a bacterium?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Why is the sky blue?",
    "Write a short email asking my manager for a day off next Friday.",
    "What are the main causes of inflation, and how do central banks respond to it?",
    "Translate 'good morning, how are you?' into Spanish and French.",
    "List five healthy breakfast ideas that take under ten minutes.",
    "Explain what a hash table is and when you would use one instead of a list.",
    "What should I pack for a three-day hiking trip in the mountains?",
    "Describe the water cycle step by step.",
    "How does compound interest work? Give a numeric example.",
    "Write a limerick about a cat who loves to code.",
    "What is machine learning, in one paragraph?",
    "Compare electric cars and petrol cars in terms of cost, emissions and maintenance.",
    "How can I improve my public speaking skills?",
    "What is the Pythagorean theorem and how is it used in everyday life?",
    "Suggest a name for a bakery that specialises in sourdough bread.",
    "Explain the rules of chess for a complete beginner, briefly.",
    "What are black holes and how do they form?",
    "Write a SQL query that returns the ten most recent orders from an orders table.",
    "Give me a recipe for a simple tomato pasta sauce.",
    "What is the difference between weather and climate?",
    "Explain recursion with a simple example.",
    "How do vaccines train the immune system?",
    "What are some good strategies for learning a new language as an adult?",
    "Describe the main features of Gothic architecture.",
    "Why do we have leap years?",
]

SYSTEM_POLICY = (
    "You are a customer support assistant for Acme Cloud. Always be polite and concise. Never reveal internal "
    "tooling. If a customer asks about billing, explain that invoices are issued on the first day of each month, "
    "that payment is due within thirty days, and that late payments incur a two percent fee. If a customer asks "
    "about outages, point them to the status page and apologise for the inconvenience. For security questions, "
    "remind them to enable two-factor authentication and to rotate API keys every ninety days. "
)


def chat_prompts(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """`n` single-turn chats drawn from QUESTIONS, some with a short context sentence for a length mix."""
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        question = QUESTIONS[i % len(QUESTIONS)]
        if rng.random() < 0.4:
            question = f"{rng.choice(QUESTIONS)} Also: {question}"
        chats.append([{"role": "user", "content": question}])
    return chats


def mixed_workload(n: int, max_tokens: tuple[int, ...] = (32, 64, 128), seed: int = 0
                   ) -> list[tuple[list[dict[str, str]], int]]:
    """`n` (chat, max_tokens) pairs with a realistic length mix: mostly short questions, some with a second
    question, one in ten behind a support-policy system prompt of a few hundred tokens."""
    rng = random.Random(seed)
    work = []
    for chat in chat_prompts(n, seed):
        if rng.random() < 0.1:
            chat = [{"role": "system", "content": SYSTEM_POLICY * rng.randint(2, 4)}] + chat
        work.append((chat, rng.choice(max_tokens)))
    return work


def long_system_chat(question: str, target_tokens: int, tokenizer) -> list[dict[str, str]]:
    """A chat whose system prompt is about `target_tokens` tokens long."""
    per = len(tokenizer.encode(SYSTEM_POLICY))
    system = SYSTEM_POLICY * max(1, round(target_tokens / per))
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]
