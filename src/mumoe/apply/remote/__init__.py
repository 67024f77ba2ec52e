"""The modelling file shipped inside mumoe-form exports (`mumoe_modeling.py`), for trust_remote_code loading."""
