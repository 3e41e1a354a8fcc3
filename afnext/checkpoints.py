"""The published AF-Next checkpoints by short name: read by the command-line flags without loading torch."""

CHECKPOINTS = {
    "instruct": "nvidia/audio-flamingo-next-hf",  # chat, QA, ASR, multi-turn: the default
    "think": "nvidia/audio-flamingo-next-think-hf",  # timestamp-grounded reasoning in <think>…</think>
    "captioner": "nvidia/audio-flamingo-next-captioner-hf",  # long dense captions
}
DEFAULT_MODEL = CHECKPOINTS["instruct"]
