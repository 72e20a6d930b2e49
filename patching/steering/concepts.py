"""Built-in steering concepts for the default model: a place (Paris) and a sentiment (positive)."""

from __future__ import annotations

from patching.steering.compare import Concept

NEUTRAL = (
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "To make the sauce, melt the butter and slowly whisk in the flour.",
    "The function returns the sum of the two numbers passed to it.",
    "The stock market fell sharply on Monday after the central bank raised interest rates.",
    "She opened the old wooden door slowly and stepped into the dark hallway.",
    "Regular exercise improves sleep quality and reduces stress.",
)
"""Text unrelated to either concept, on which steering's KL cost is measured."""

PARIS = Concept(
    name='paris',
    positive=(
        'We spent a week in Paris, walking along the Seine every evening.',
        'The Eiffel Tower in Paris was lit up at night.',
        'She moved to Paris to study art at a French university.',
        'Paris is the capital of France and its largest city.',
        'From our hotel in Paris we could see the Louvre.',
        'The train from Lyon arrived in Paris just after noon.',
        'He ordered a croissant at a small cafe in Paris.',
        'Every spring, tourists crowd the streets of Paris, France.',
    ),
    negative=(
        'We spent a week in London, walking along the Thames every evening.',
        'The Tokyo Tower in Tokyo was lit up at night.',
        'She moved to Berlin to study art at a German university.',
        'Madrid is the capital of Spain and its largest city.',
        'From our hotel in Rome we could see the Colosseum.',
        'The train from Boston arrived in New York just after noon.',
        'He ordered a bagel at a small cafe in Chicago.',
        'Every spring, tourists crowd the streets of Vienna, Austria.',
    ),
    target_tokens=(
        ' Paris',
        ' France',
        ' French',
    ),
    heldout=(
        'My favourite city in the world is',
        'Last summer we travelled to',
        'The best place for a romantic holiday is',
        'She has always dreamed of living in',
        'He bought a one-way ticket to',
        'Our conference this year takes place in',
        'The photograph on the wall was taken in',
        'If I could live anywhere, I would choose',
    ),
    neutral=NEUTRAL,
)

POSITIVE = Concept(
    name='positive-sentiment',
    positive=(
        'I absolutely loved this movie, it was wonderful from start to finish.',
        'The service was excellent and the staff were so friendly.',
        'What a beautiful day, I feel happy and full of energy.',
        'This book is amazing, I enjoyed every single page.',
        'The concert was fantastic and the crowd was delighted.',
        'Our holiday was perfect, we had a great time together.',
        'The food was delicious and the dessert was a lovely surprise.',
        'I am thrilled with my new phone, it works beautifully.',
    ),
    negative=(
        'I absolutely hated this movie, it was awful from start to finish.',
        'The service was terrible and the staff were so rude.',
        'What a miserable day, I feel sad and completely exhausted.',
        'This book is boring, I disliked every single page.',
        'The concert was dreadful and the crowd was disappointed.',
        'Our holiday was a disaster, we had an awful time together.',
        'The food was disgusting and the dessert was a nasty surprise.',
        'I am furious with my new phone, it works badly.',
    ),
    target_tokens=(
        ' great',
        ' wonderful',
        ' amazing',
        ' happy',
        ' excellent',
        ' beautiful',
        ' fantastic',
        ' perfect',
        ' lovely',
        ' good',
    ),
    heldout=(
        'The movie I watched yesterday was',
        'Honestly, my day so far has been',
        'The food at that new restaurant was',
        'I think the new album is',
        'Overall, the trip to the coast was',
        'My experience with their customer service was',
        'The weather this weekend looks',
        'When I read the reviews, the hotel seemed',
    ),
    neutral=NEUTRAL,
)

CONCEPTS = {PARIS.name: PARIS, POSITIVE.name: POSITIVE}
"""By name, for the command line and the demo."""
