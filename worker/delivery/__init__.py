"""How a task message reaches a model and its result reaches Redis, through restarts and bad input:
the worker's consumer (:mod:`.consumer`), what it admits (:mod:`.admission`), dead letters
(:mod:`.dead_letters`), escalations nobody takes (:mod:`.expiry`) and the result backend
(:mod:`.results`)."""
