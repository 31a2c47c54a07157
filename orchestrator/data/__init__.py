"""The data a run trains on: datasets of (input_text, target_text) pairs (`datasets`), the teacher that
embeds them (`teacher`) and the corpora the project builds (`corpus_*`)."""
