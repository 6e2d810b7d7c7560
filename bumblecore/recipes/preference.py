"""Preference pairs (training_stage dpo; pref_loss sigmoid, ipo, orpo or simpo): a unit is a chosen and
a rejected row (train/dpo.py). A mixture may hold SFT sources beside the pairs, each a loss term of
its own (train/auxiliary.py)."""

from __future__ import annotations

import dataclasses

from bumblecore.data.dataset import run_sources
from bumblecore.data.formats import StageReading
from bumblecore.recipes.base import Recipe, StageData, step_loader, token_data
from bumblecore.recipes.sft import SFTRecipe
from bumblecore.train.auxiliary import StepsWithSFT, WithSFT, split_sft_sources
from bumblecore.train.dpo import build_preference_stage

PREFERENCE_FORMATS = ("preference_alpaca", "preference_sharegpt", "preference_messages")


class PreferenceRecipe(Recipe):
    name = "dpo"
    reading = StageReading(name, PREFERENCE_FORMATS, pairs=True)
    rows_per_unit = 2  # a pair's chosen and rejected rows
    plans_padded_rows = True
    build_stage = staticmethod(build_preference_stage)

    def adapter_off_reference(self, run) -> bool:
        return not run.preference.reference_free and not run.preference.ref_model_path

    def notes(self, run) -> list[str]:
        preference, notes = run.preference, []
        if not preference.reference_free:
            return notes
        if preference.precompute_ref_log_probs is not None:
            notes.append(
                f"precompute_ref_log_probs {preference.precompute_ref_log_probs} is ignored: pref_loss "
                f"{preference.pref_loss} uses no reference model"
            )
        if preference.pref_loss == "simpo" and preference.pref_beta < 1.0:
            notes.append(
                f"pref_beta {preference.pref_beta} is SimPO's beta here; SimPO's papers use ~2.0 "
                "(0.1 is DPO's default, kept as the key's default)"
            )
        return notes

    def frozen_copy(self, run, total: int, trainable: int) -> int:
        """The reference: a second model where it is not the policy itself (LoRA's base with the adapter
        off) nor precomputed log-probs."""
        preference, full = run.preference, run.model.finetuning_type == "full"
        if preference.reference_free or not (
            preference.ref_model_path or (full and preference.precompute_ref_log_probs is False)
        ):
            return 0
        return total - (trainable if run.model.finetuning_type == "lora" else 0)

    def data(self, fabric, run, tokenizer, pad_id: int) -> StageData:
        pairs, conversations = sft_beside(run)
        if not conversations:
            return token_data(fabric, run, tokenizer, pad_id, self.reading, self.plans_padded_rows)
        # the pairs as one dataset, each SFT source its own
        paths = ([path for source in pairs for path in source.paths], "dataset_path pairs")
        return token_data(
            fabric,
            run,
            tokenizer,
            pad_id,
            self.reading,
            self.plans_padded_rows,
            paths,
            conversations,
            SFTRecipe.reading,
        )

    def stage(self, fabric, run, model, data: StageData, load_model, resuming: bool):
        def load_reference(path):
            return load_model(
                dataclasses.replace(
                    run,
                    model=dataclasses.replace(run.model, model_name_or_path=path),
                    optimization=dataclasses.replace(run.optimization, enable_gradient_checkpointing=False),
                ),
                fabric,
            )

        pad_id = data.pad_id
        stage, attach_reference = self.build_stage(
            fabric,
            run,
            model,
            data.units,
            data.eval_units,
            pad_id,
            resuming=resuming,
            load_reference_model=load_reference,
        )
        loader = attach_reference(data.loader, "train")
        eval_loader = attach_reference(data.eval_loader, "eval") if data.eval_loader is not None else None
        if data.beside:
            loader = StepsWithSFT(
                loader, {name: step_loader(fabric, run, u, pad_id, True) for name, (_, (_, u)) in data.beside.items()}
            )
            weights = {name: source.loss_weight for name, (source, _) in data.beside.items()}
            stage = WithSFT(stage, weights, main=self.name)
        return stage, loader, eval_loader


def sft_beside(run) -> tuple[list, list]:
    """A dpo/kto run's (preference sources, SFT sources); the pairs take no sampling or loss weights."""
    pairs, conversations = split_sft_sources(run_sources(run.data, run.data.dataset_path))
    if conversations and (
        run.data.mix_strategy != "concat" or any(s.weight != 1.0 or s.loss_weight != 1.0 for s in pairs)
    ):
        raise ValueError(
            "dataset_path: beside SFT sources, the preference sources are one dataset (mix_strategy concat, "
            "loss weight 1); the SFT sources take loss weights"
        )
    return pairs, conversations
