# Sourced by the recipes aimed at transformers.Trainer workloads (finetune_recipe.sh,
# lm_schedule_recipe.sh, classify_recipe.sh): their task families (one slot each) and the PES settings
# they share (pes).
families=(digits permuted_digits patches teacher ft_digits_full ft_digits_head ft_digits_lora
          lm_d16_l1_t16 lm_d16_l2_t32 lm_d32_l1_t32 ft_lm_full ft_lm_lora)
pes=(--slots_per_family 1 --truncation 25 --min_unroll 50 --held_in_every 50 --checkpoint_every 10)
shared=("${pes[@]}" --families "${families[@]}")
