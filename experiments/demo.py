"""The main demo: zip two LeNet-300-100 trained on Fashion-MNIST into one model.

Trains two LeNet-300-100 with different seeds (a few epochs), permutes their hidden units,
zips both hidden layers fully with and without light retraining, prints a table, saves
the zipped model, exports it (.keras, SavedModel, TFLite; parity-checked) and prints what
zipping saves in file size and latency against the two separate models.
"""

import quiet_startup  # noqa: F401 (first: quiets TensorFlow's native log)

import os

from absl import flags

import mtz_tf
from mtz_tf import cli, data, io_utils, models, training

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "artifacts/demo", "Where models and the report go.")
flags.DEFINE_integer("epochs", 3, "Training epochs of each input model.")
flags.DEFINE_integer("retrain_steps", 150, "Joint retraining iterations after each layer.")
flags.DEFINE_string("data_dir", None, "Directory of Fashion-MNIST IDX files.")


def main(argv):
    del argv
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    splits = data.load_task("fashion_mnist", data_dir=FLAGS.data_dir)
    tasks = ("fashion_a", "fashion_b")
    originals = {}
    for seed, task in enumerate(tasks, start=1):
        cli.logger.info(f"== Training {task}: LeNet-300-100, seed {seed}, {FLAGS.epochs} epochs")
        model = models.lenet_300_100(seed=seed, name=task)
        training.train_classifier(
            model,
            *splits["train"],
            FLAGS.epochs,
            validation=splits["validation"],
            seed=seed,
            verbose=2,
        )
        originals[task] = models.permute_hidden(model, seed=100 + seed)
        io_utils.save_model(originals[task], os.path.join(FLAGS.output_dir, f"{task}.keras"))
    steps_per_epoch = -(-len(splits["train"][0]) // 128)
    x, y = splits["train"]
    calibration = {
        t: data.to_dataset(data.calibration_subset(x, 2000, seed=i), batch_size=500)
        for i, t in enumerate(tasks)
    }
    evaluation = {t: data.to_dataset(*splits["test"], batch_size=1000) for t in tasks}
    cli.logger.info("== Zipping both hidden layers fully, no retraining")
    _, plain = mtz_tf.zip_models(originals, calibration, share=1.0, evaluation=evaluation)
    cli.logger.info(
        f"== Zipping both hidden layers fully, {FLAGS.retrain_steps} retraining steps/layer"
    )
    retrain = mtz_tf.Retrain(
        {t: data.training_stream(x, y, 32, seed=i) for i, t in enumerate(tasks)},
        steps_per_layer=FLAGS.retrain_steps,
        verbose=2,
    )
    zipped, report = mtz_tf.zip_models(
        originals, calibration, share=1.0, retrain=retrain, evaluation=evaluation
    )
    path = os.path.join(FLAGS.output_dir, "zipped.keras")
    io_utils.save_model(zipped, path)
    io_utils.write_json(os.path.join(FLAGS.output_dir, "report.json"), report.to_dict())
    figure = os.path.join(FLAGS.output_dir, "report.png")
    report.save_figure(figure)
    print(f"\nZip report (retrained), per hidden layer:\n{report.table()}")
    print(f"Report figure: {figure}")

    print("\n| task | error original | error zipped | error zipped + retrained |")
    print("|---|---|---|---|")
    for task in tasks:
        print(
            f"| {task} | {100 * (1 - report.accuracy_original[task]):.2f} % | "
            f"{100 * (1 - plain.layers[-1].accuracy_before_retraining[task]):.2f} % | "
            f"{100 * (1 - report.layers[-1].accuracy_after_retraining[task]):.2f} % |"
        )
    print(
        f"\nRetraining: {report.retrain_steps} joint iterations "
        f"(training one model took {FLAGS.epochs * steps_per_epoch} iterations)."
    )
    print(f"Saved {path}")
    print(
        "\n== Deployment: .keras, SavedModel (serve + serve_<task>) and TFLite, checked by "
        "loading them back; zipped vs the two separate models"
    )
    x_test, y_test = splits["test"]
    print(
        mtz_tf.deployment_report(
            zipped,
            originals,
            os.path.join(FLAGS.output_dir, "deploy"),
            sample_inputs=(x_test[:1000], y_test[:1000]),
            overwrite=True,
        )
    )


if __name__ == "__main__":
    cli.run(main)
