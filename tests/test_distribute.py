"""Several MirroredStrategy objects in one process (a notebook training twice, this test session).

The abort this guards against ("Collective instance 100 expected type 2 and data_type 3 but got type
0 and data_type 1") appeared when test_oim's 2-replica fit (int32 all-gather) ran before
test_train's 2-replica step in one pytest process.
"""
import tensorflow as tf

from reid_keras.training.distribute import choose_strategy, mirrored_strategy

CPUS = ["/cpu:0", "/cpu:1"]


def _group_key(strategy):
    # The first collective group key the strategy will hand out (TF private state, read-only here).
    return strategy.extended._collective_keys._group_key


def test_each_strategy_gets_its_own_collective_keys_and_still_works():
    first, second = mirrored_strategy(CPUS), choose_strategy(CPUS)
    assert abs(_group_key(first) - _group_key(second)) >= 100000

    def gather(strategy, value, dtype):
        step = tf.function(lambda: strategy.run(
            lambda: tf.distribute.get_replica_context().all_gather(tf.constant([value], dtype), 0)))
        return strategy.experimental_local_results(step())

    ints, floats = gather(first, 3, tf.int32), gather(second, 1.5, tf.float32)
    assert [v.numpy().tolist() for v in ints] == [[3, 3], [3, 3]]
    assert [v.numpy().tolist() for v in floats] == [[1.5, 1.5], [1.5, 1.5]]
