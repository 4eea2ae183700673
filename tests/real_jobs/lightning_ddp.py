"""A Lightning job with ``strategy="ddp"`` on CPU ranks: a small transformer LM, Lightning's own loop.

Under torchrun Lightning sees torchelastic's environment and builds DDP itself (no spawn); ``devices`` must equal
the ranks per node. Prints ``step N loss X`` from rank 0. ``python lightning_ddp.py --devices 2 --steps 30``
"""

import argparse
import time

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, default=2)
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--step-sleep", type=float, default=0.0)
args = parser.parse_args()

VOCAB, SEQ, DIM = 128, 32, 128  # > 1 MB of parameters: DDP rebuilds its buckets after step 1


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False, is_causal=True,
                          attn_mask=nn.Transformer.generate_square_subsequent_mask(x.size(1)))[0]
        return x + self.mlp(self.ln2(x))


class LM(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(4))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        loss = F.cross_entropy(self(ids[:, :-1]).reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        if self.global_rank == 0:
            print(f"step {self.global_step} loss {loss.item():.6f}", flush=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        time.sleep(args.step_sleep)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


L.seed_everything(0, verbose=False)
data = torch.randint(VOCAB, (2048, SEQ + 1), generator=torch.Generator().manual_seed(0))
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)
trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp", max_steps=args.steps, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(LM(), loader)
