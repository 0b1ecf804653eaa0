"""The built-in tasks: presets of the same `TaskConfig` a user writes in YAML.

A preset is plain data; `config.resolve_presets` merges the user's keys over it. Nothing
outside this table names SST, CFIMDB, Quora or STS.
"""

PRESETS: dict[str, dict] = {
    "sst": dict(
        text_columns=["sentence"], label_column="sentiment", kind="classification",
        num_classes=5, metric="accuracy", prediction_column="Predicted_Sentiment",
        label_names=["very negative", "negative", "neutral", "positive", "very positive"],
        train_file="ids-sst-train.csv", dev_file="ids-sst-dev.csv",
        test_file="ids-sst-test-student.csv"),
    "cfimdb": dict(
        text_columns=["sentence"], label_column="sentiment", kind="classification",
        num_classes=2, metric="accuracy", prediction_column="Predicted_Sentiment",
        label_names=["negative", "positive"], train_file="ids-cfimdb-train.csv",
        dev_file="ids-cfimdb-dev.csv", test_file="ids-cfimdb-test-student.csv"),
    "quora": dict(
        text_columns=["sentence1", "sentence2"], label_column="is_duplicate",
        kind="classification", num_classes=2, loss="bce", metric="accuracy",
        label_names=["not duplicate", "duplicate"], prediction_column="Predicted_Is_Paraphrase",
        train_file="quora-train.csv", dev_file="quora-dev.csv", test_file=None),
    "sts": dict(
        text_columns=["sentence1", "sentence2"], label_column="similarity", kind="regression",
        label_range=[0.0, 5.0], metric="pearson", prediction_column="Predicted_Similarity",
        train_file="sts-train.csv", dev_file="sts-dev.csv", test_file="sts-test-student.csv"),
}
