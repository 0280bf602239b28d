"""Teacher: full fine-tuning or LoRA fine-tuning of any sequence-classification checkpoint."""

from __future__ import annotations

from typing import Literal

from torch import nn

from kdlora.data.tokenizer import load_tokenizer
from kdlora.losses import task_loss
from kdlora.training.args import ExportArgs, LoRAArgs, OptimizerArgs, as_args, save_plain_hyperparameters
from kdlora.training.heads import check_head, new_weight_modules
from kdlora.training.loading import check_tokenizer_fits, load_classifier
from kdlora.training.lora import apply_lora
from kdlora.training.module import GLUEModule


class Teacher(GLUEModule):
    """Fine-tune `model_name_or_path` on a GLUE task.

    Args:
        model_name_or_path: hub id (e.g. ``bert-base-uncased``) or local Hugging Face directory.
        task: GLUE task (linked from the data module by the CLI).
        finetune: ``full`` (all weights) or ``lora`` (peft adapters + classifier head).
        lora: LoRA rank, scaling numerator, dropout and targets (`LoRAArgs`; default targets: the family's
            query/value projections), with ``finetune: lora``.
        head: which head modules train beside the adapters (``finetune: lora``). ``new``: the whole
            head and every newly initialised weight (e.g. DistilBERT's ``pre_classifier``, a pooler
            the checkpoint lacks). ``seq_cls``: only the final classifier layer, as the report's "adapters + final
            classifier" count assumes (BERT, DistilBERT, DeBERTa ``classifier``; RoBERTa
            ``classifier.out_proj``); newly initialised non-final layers (DistilBERT's ``pre_classifier``,
            a missing pooler) then stay frozen at their random init, loaded ones at their loaded values.
        optimizer: AdamW + linear warmup/decay (`OptimizerArgs`).
        export: write the best model (LoRA merged, adapter kept in ``adapter/``) at fit end (`ExportArgs`).
    """

    def __init__(
        self,
        model_name_or_path: str = "bert-base-uncased",
        task: str = "mrpc",
        finetune: Literal["full", "lora"] = "full",
        lora: LoRAArgs = LoRAArgs(),
        head: str = "new",
        optimizer: OptimizerArgs = OptimizerArgs(learning_rate=2e-5),
        export: ExportArgs = ExportArgs(),
    ) -> None:
        super().__init__(task, optimizer, export)
        lora = as_args(LoRAArgs, lora)
        if finetune not in ("full", "lora"):
            raise ValueError(f"finetune must be 'full' or 'lora', got {finetune!r}")
        check_head(head)
        if head != "new" and finetune == "full":
            raise ValueError(f"head: {head} chooses the head trained beside LoRA adapters: use it with finetune: lora "
                             "(full fine-tuning trains every weight)")
        save_plain_hyperparameters(self, lora=lora, optimizer=self.optimizer_args, export=self.export_args)
        model, new_weights = load_classifier(model_name_or_path, self.spec.num_labels, self.spec.is_regression)
        check_tokenizer_fits(model, load_tokenizer(model_name_or_path, "model_name_or_path"), model_name_or_path, model_name_or_path)
        if finetune == "lora":
            # Newly initialised weights (classifier, a missing pooler) train alongside the adapters (head: new).
            model = apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.targets, new_weight_modules(new_weights), head)
        # transformers returns models in eval mode; Lightning keeps submodule modes, so without
        # this dropout would silently stay off during training.
        self.model: nn.Module = model.train()
        self.newly_initialised = new_weights

    def training_step(self, batch, batch_idx):
        loss = task_loss(self(batch), batch["labels"], self.spec.is_regression)
        self.log("train/loss", loss, prog_bar=True)
        return loss
