"""Con-GRPO training core: pure GRPO math (``algo``) and the jitted SFT / Con-GRPO update (``update``)."""
