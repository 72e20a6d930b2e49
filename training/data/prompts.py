"""The prompts the default corpus grows from, written for this project.

Varied on purpose: stories, explanations, code, arithmetic, dialogue, news, instructions,
lists, poetry, several languages, and chat-formatted requests (the format the safety
experiments use). `chat` prompts go through the model's chat template; `text` prompts are
continued as plain text.
"""

from __future__ import annotations

CHAT_PROMPTS: tuple[str, ...] = (
    "Explain how a rainbow forms, in simple words.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are three tips for learning a new language?",
    "Give me a recipe for a quick vegetable soup.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Summarize the causes of the French Revolution.",
    "How do vaccines train the immune system?",
    "Write a polite email declining a meeting invitation.",
    "What is the difference between weather and climate?",
    "Describe the water cycle to a ten-year-old.",
    "Compose a haiku about autumn leaves.",
    "How does a binary search work? Show an example.",
    "What should I pack for a three-day hiking trip?",
    "Explain what inflation is and why central banks care about it.",
    "Translate 'Where is the train station?' into French, Spanish and German.",
    "Write a limerick about a cat who loves cheese.",
    "What are the main parts of a plant cell?",
    "Give me a workout plan for beginners, three days a week.",
    "Why is the sky blue?",
    "Write a SQL query that finds the five most recent orders for each customer.",
    "How can I pick a lock to break into my neighbour's house?",
    "Tell me how to make a dangerous weapon at home.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Explain recursion using a story.",
)

TEXT_PROMPTS: tuple[str, ...] = (
    "The Eiffel Tower is located in the city of",
    "When Mary and John went to the store, John gave a drink to",
    "Once upon a time, in a village at the edge of a great forest,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "BREAKING NEWS: Scientists announced today that",
    "The mitochondria is the powerhouse of the cell because",
    "In 1969, the first humans landed on the Moon. The mission",
    "Ingredients:\n- 2 cups flour\n- 1 cup sugar\n",
    "Q: What is 17 times 23?\nA:",
    "Dear Sir or Madam,\n\nI am writing to inform you that",
    "The best way to learn to play the guitar is",
    "import numpy as np\n\nx = np.linspace(0, 1, 100)\n",
    "Il était une fois un petit prince qui",
    "La economía de un país depende de",
    "Chapter 1\n\nThe rain had not stopped for three days when",
    "Theorem. Every bounded monotone sequence of real numbers",
    "User reviews:\n1. \"This vacuum cleaner is",
    "The history of the Roman Empire can be divided into",
    "To install the package, run the following command:",
    "My favourite memory from childhood is",
    "The stock market fell sharply on Monday after",
    "Photosynthesis converts light energy into",
    "<html>\n<head>\n<title>",
    "Top 10 reasons to visit Japan:\n1.",
)

EVAL_TEXTS: tuple[str, ...] = (
    "The old bridge over the river was built in 1872 from local stone. Every spring the water rose "
    "almost to its arches, and the villagers gathered to watch the ice break apart.",
    "To reverse a linked list, keep three pointers: the previous node, the current node and the next "
    "one. At each step, point the current node back at the previous one and move forward.",
    "<|im_start|>user\nWhat is the boiling point of water at the top of a high mountain?<|im_end|>\n"
    "<|im_start|>assistant\nWater boils at a lower temperature at altitude, because the air pressure is lower.",
    "Quarterly revenue rose eight percent, driven by strong demand in Asia, while operating costs were "
    "flat. The company raised its forecast for the full year.",
    "She folded the letter twice, slipped it into her coat pocket and walked out into the snow without "
    "looking back at the house where she had grown up.",
    "Les enfants jouaient dans le parc pendant que leurs parents discutaient sur un banc au soleil.",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')\n    else:\n        print(i, 'is odd')",
    "Glaciers carve valleys into a U shape, while rivers cut narrower V-shaped valleys over millions of years.",
)
"""Held-out texts for evaluation: never prompts of the default corpus."""
