"""A Hugging Face ``Trainer`` job on a GPT-2 config built from scratch: no download, no tokenizer.

The data are seeded random token ids; the model is ``GPT2LMHeadModel`` (blocks under ``model.transformer.h``).
Under torchrun the Trainer (through Accelerate) wraps it in DDP itself. Prints ``step N loss X`` from rank 0.
``--gradient-checkpointing`` switches on the Trainer's own (``TrainingArguments(gradient_checkpointing=True)``).
``python hf_trainer.py --steps 30 --step-sleep 0.05 --out DIR``
"""

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--step-sleep", type=float, default=0.0)
parser.add_argument("--out", required=True)
parser.add_argument("--gradient-checkpointing", action="store_true")
args = parser.parse_args()

VOCAB, SEQ = 128, 32


class RandomIds(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.ids = torch.randint(VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class PrintLoss(TrainerCallback):
    def on_log(self, training_args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            print(f"step {state.global_step} loss {logs['loss']}", flush=True)

    def on_step_end(self, training_args, state, control, **kwargs):
        time.sleep(args.step_sleep)


torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=4, n_head=4))
training = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             seed=0, disable_tqdm=True, dataloader_num_workers=0,
                             gradient_checkpointing=args.gradient_checkpointing)
Trainer(model=model, args=training, train_dataset=RandomIds(512), callbacks=[PrintLoss()]).train()
