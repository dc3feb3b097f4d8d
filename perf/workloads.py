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


PASSAGE = (
    "The Rhine is one of the major rivers of Europe. It rises in the Swiss Alps, forms part of the border "
    "between Switzerland and Liechtenstein, Switzerland and Austria, and Switzerland and Germany, and then "
    "flows through Germany and the Netherlands before it empties into the North Sea at Rotterdam. The river "
    "is about 1,230 kilometres long. For centuries it has been an important trade route: barges carry coal, "
    "grain, chemicals and containers between the port of Rotterdam and the industrial cities along its "
    "banks, such as Duisburg, Cologne and Basel. The middle Rhine, between Bingen and Koblenz, is famous for "
    "its steep vineyards, its castles and the Lorelei rock, and it has been a UNESCO World Heritage Site since "
    "2002. Pollution was a serious problem in the twentieth century, but after the Sandoz chemical spill in "
    "1986 the countries along the river agreed on the Rhine Action Programme, and salmon have since returned "
    "to parts of the river.")
DOCUMENT = (
    "INVOICE\nInvoice number: INV-2026-0412\nDate: 14 March 2026\nBill to: Maria Keller, Keller & Sons "
    "GmbH, Hauptstrasse 12, 80331 Munich, Germany\nFrom: Northwind Supplies Ltd, 5 Harbour Road, Leith, "
    "Edinburgh EH6 6QJ\nItems:\n- 12 x Office chair, model NW-200, at 149.00 EUR each: 1,788.00 EUR\n"
    "- 3 x Standing desk, model NW-D5, at 420.00 EUR each: 1,260.00 EUR\n- 1 x Delivery and assembly: "
    "180.00 EUR\nSubtotal: 3,228.00 EUR\nVAT (19%): 613.32 EUR\nTotal due: 3,841.32 EUR\nPayment terms: "
    "30 days, by bank transfer to IBAN DE44 5001 0517 5407 3249 31\n")
FUNCTION = '''def moving_average(values, window):
    """The mean of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    if window > len(values):
        return []
    averages = []
    total = sum(values[:window])
    averages.append(total / window)
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages
'''
GROUNDED_TASKS = {
    "summarise a passage": PASSAGE + "\n\nSummarise the passage above in three sentences, reusing its wording.",
    "extract fields": "Here is an invoice:\n\n" + DOCUMENT + "\nWhat are the invoice number, the date, the "
                                                            "customer and the total due? Answer as a list.",
    "edit a function": FUNCTION + "\nRename the parameter `values` to `samples` and `window` to `size` in the "
                                  "function above, and give the whole function back.",
}
