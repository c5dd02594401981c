"""Gate distillation (Lite MoBA): `moba-distill`, see distill.py."""
