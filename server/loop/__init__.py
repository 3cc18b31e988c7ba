"""What makes and vets the next version: safe rollout (rollout.py: policy and comparison; rollout_state.py:
decisions kept), drift tracking (drift.py) and opt-in capture of served images (capture.py, over
capture_folder.py: the folder, layout and bounds that bulk jobs share)."""
