"""The built-in tasks: presets of the same `TaskConfig` a user writes in YAML.

A preset is plain data; `config.resolve_presets` merges the user's keys over it. Nothing
outside this table names SST, CFIMDB, Quora or STS.

The GLUE presets (Wang et al. 2019) read the official train files as they are, in the layout
of `../shared/data/glue` (`--data-dir ../shared/data/glue`; its README): tab-separated, no
quoting, CoLA without a header line. Labels and predictions are the files' own values (0/1,
or RTE's names), so predictions on the official dev files score against their labels as read.
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
    "cola": dict(
        columns=["source", "label", "original_mark", "sentence"], text_columns=["sentence"],
        label_column="label", kind="classification", num_classes=2, metric="matthews",
        quoting="none", train_file="CoLA/train.tsv", dev_file="CoLA/dev.tsv"),
    "mrpc": dict(
        text_columns=["#1 String", "#2 String"], label_column="Quality", kind="classification",
        num_classes=2, metric=["f1", "accuracy"], quoting="none",
        train_file="MRPC/train.tsv", dev_file="MRPC/dev.tsv"),
    "rte": dict(
        text_columns=["sentence1", "sentence2"], label_column="label", id_column="index",
        kind="classification", num_classes=2, label_names=["entailment", "not_entailment"],
        metric="accuracy", quoting="none", train_file="RTE/train.tsv", dev_file="RTE/dev.tsv"),
    "stsb": dict(
        text_columns=["sentence1", "sentence2"], label_column="score", id_column="index",
        kind="regression", label_range=[0.0, 5.0], metric=["pearson", "spearman"],
        quoting="none", train_file="STS-B/train.tsv", dev_file="STS-B/dev.tsv"),
    "wnli": dict(
        text_columns=["sentence1", "sentence2"], label_column="label", id_column="index",
        kind="classification", num_classes=2, metric="accuracy", quoting="none",
        train_file="WNLI/train.tsv", dev_file="WNLI/dev.tsv"),
    "sst2": dict(
        text_columns=["sentence"], label_column="label", kind="classification", num_classes=2,
        metric="accuracy", quoting="none", train_file="SST-2/train.tsv",
        dev_file="SST-2/dev.tsv"),
}
