"""Other methods' wrappers, run on SD3 pipelines for comparison (not catpatch's own data path):
diffusers' TaylorSeerCache (`taylorseer`), MagCache (`magcache`) and FirstBlockCache
(`firstblock`)."""
