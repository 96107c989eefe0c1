"""Constants of the evaluation tests' tiny split (a plain module: `conftest` names collide).

48 x 56 images, resized to 55 x 64 inside the 64 x 64 padding; NUM_VAL = 5 with eval batch 4
gives a second batch with 1 valid and 3 padding examples.
"""

SIZE = (48, 56)
NUM_VAL = 5
