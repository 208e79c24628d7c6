"""PyTorch interop: torch -> normd -> torch round trips preserve outputs (eval mode, <= 1e-6)."""

import os
import sys
import unittest

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import normd  # noqa: E402
from normd import pb  # noqa: E402
from normd_server import NormdServer  # noqa: E402

SERVER = None
TOL = 1e-6


def setUpModule():
    global SERVER
    SERVER = NormdServer().__enter__()


def tearDownModule():
    SERVER.__exit__(None, None, None)


def warm_up(seq, x, steps=5):
    """Trains a few steps so weights and BatchNorm buffers are far from their initial values."""
    seq.train()
    opt = torch.optim.SGD(seq.parameters(), lr=0.05, momentum=0.9)
    for i in range(steps):
        opt.zero_grad()
        out = seq(x * (1 + 0.1 * i) + 0.3)  # shifted batches: running stats move
        out.square().mean().backward()
        opt.step()
    seq.eval()


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


class InteropTest(unittest.TestCase):
    def setUp(self):
        self.c = SERVER.client
        torch.manual_seed(0)
        self.created = []

    def tearDown(self):
        for mid in self.created:
            try:
                self.c.delete_model(mid)
            except normd.NormdError:
                pass

    def round_trip(self, seq, input_shape, x, mid):
        """torch -> normd -> torch; returns (torch out, normd out, torch again out)."""
        with torch.no_grad():
            expected = seq(x).numpy()
        model = normd.from_torch(self.c, seq, input_shape, loss="cross_entropy",
                                 optimizer=torch.optim.SGD(seq.parameters(), lr=0.1), id=mid)
        self.created.append(model.id)
        self.assertEqual(model.mode, pb.MODE_EVAL)
        served = self.c.predict(model.id, x.numpy())
        back = normd.to_torch(self.c, model.id)
        self.assertFalse(back.training)
        with torch.no_grad():
            again = back(x).numpy()
        original = seq.state_dict()
        for name, value in back.state_dict().items():
            self.assertTrue(torch.equal(value, original[name]), name)
            self.assertEqual(value.dtype, original[name].dtype, name)
        return expected, served, again

    def test_mlp_round_trip(self):
        seq = nn.Sequential(
            nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Linear(32, 32), nn.BatchNorm1d(32, momentum=None), nn.LeakyReLU(0.2),
            nn.Linear(32, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(0.3),
            nn.Linear(16, 16, bias=False), nn.BatchNorm1d(16, affine=False), nn.Tanh(),
            nn.Linear(16, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Sigmoid(),
            nn.Linear(8, 5))
        x = torch.randn(64, 20)
        warm_up(seq, x)
        expected, served, again = self.round_trip(seq, [20], x, "interop-mlp")
        err = rel_err(served, expected)
        print(f"MLP: normd vs torch relative error {err:.2e}, max abs "
              f"{np.abs(served - expected).max():.2e}")
        self.assertLessEqual(err, TOL)
        np.testing.assert_allclose(served, expected, rtol=0, atol=TOL * np.abs(expected).max())
        np.testing.assert_array_equal(again, expected)

    def test_cnn_round_trip(self):
        seq = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(16, momentum=None),
            nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))
        x = torch.randn(32, 1, 8, 8)
        warm_up(seq, x)
        expected, served, again = self.round_trip(seq, [1, 8, 8], x, "interop-cnn")
        err = rel_err(served, expected)
        print(f"CNN: normd vs torch relative error {err:.2e}")
        self.assertLessEqual(err, TOL)
        np.testing.assert_array_equal(again, expected)

    def test_group_and_instance_norm_round_trip(self):
        seq = nn.Sequential(
            nn.Conv2d(2, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True,
                                                           track_running_stats=True),
            nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1, bias=False),
            nn.InstanceNorm2d(4, momentum=0.3), nn.GroupNorm(1, 4, eps=1e-3, affine=False),
            nn.Flatten(), nn.Linear(4 * 6 * 6, 6))
        x = torch.randn(16, 2, 6, 6)
        warm_up(seq, x)
        self.assertGreater(seq[4].running_var.sub(1).abs().max().item(), 1e-3)
        expected, served, again = self.round_trip(seq, [2, 6, 6], x, "interop-gn-in")
        err = rel_err(served, expected)
        print(f"GroupNorm/InstanceNorm CNN: normd vs torch relative error {err:.2e}")
        self.assertLessEqual(err, TOL)
        np.testing.assert_array_equal(again, expected)
        # InstanceNorm1d on (C, L) samples, trained through normd: its running statistics
        # follow torch's update for the same batches.
        seq = nn.Sequential(nn.InstanceNorm1d(3, track_running_stats=True), nn.Flatten(),
                            nn.Linear(15, 2))
        model = normd.from_torch(self.c, seq, [3, 5], loss="mse",
                                 optimizer=torch.optim.SGD(seq.parameters(), lr=0.0001),
                                 id="interop-in1d")
        self.created.append(model.id)
        xb = torch.randn(8, 3, 5) * 2 + 1
        self.c.train_step(model.id, xb.numpy(), target=np.zeros((8, 2), np.float32))
        seq.train()
        seq(xb)
        state = self.c.get_state(model.id)
        np.testing.assert_allclose(state["0.running_mean"], seq[0].running_mean.numpy(),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state["0.running_var"], seq[0].running_var.numpy(),
                                   rtol=1e-5, atol=1e-6)
        self.assertEqual(int(state["0.num_batches_tracked"]), 0)  # torch never counts here

    def test_named_children_and_train_mode(self):
        from collections import OrderedDict
        seq = nn.Sequential(OrderedDict([("fc", nn.Linear(4, 6)), ("bn", nn.BatchNorm1d(6)),
                                         ("act", nn.ReLU()), ("head", nn.Linear(6, 2))]))
        model = normd.from_torch(self.c, seq, [4], loss=nn.CrossEntropyLoss(),
                                 optimizer={"adam": {"lr": 0.01}}, id="interop-named")
        self.created.append(model.id)
        self.assertEqual(model.mode, pb.MODE_TRAIN)
        self.assertEqual([l.name for l in model.spec.layers], ["fc", "bn", "act", "head"])
        self.assertEqual(model.spec.optimizer.WhichOneof("kind"), "adam")
        # Train mode on both sides: one step each from the same state gives the same buffers.
        x = torch.randn(16, 4)
        labels = torch.randint(0, 2, (16,))
        self.c.train_step(model.id, x.numpy(), labels=labels.numpy())
        with torch.no_grad():
            seq(x)  # a training-mode forward updates the running statistics
        state = self.c.get_state(model.id)
        self.assertLessEqual(rel_err(state["1.running_mean"], seq.bn.running_mean.numpy()), 1e-5)
        self.assertLessEqual(rel_err(state["1.running_var"], seq.bn.running_var.numpy()), 1e-5)
        back = normd.to_torch(self.c, model.id)
        self.assertTrue(back.training)

    def test_frozen_and_untrainable_flags_round_trip(self):
        from collections import OrderedDict
        seq = nn.Sequential(OrderedDict([
            ("fc", nn.Linear(5, 8)), ("bn", nn.BatchNorm1d(8)), ("act", nn.ReLU()),
            ("fc2", nn.Linear(8, 8)), ("bn2", nn.BatchNorm1d(8)), ("head", nn.Linear(8, 3))]))
        x = torch.randn(32, 5)
        warm_up(seq, x)
        seq.train()
        seq.bn.eval()                   # frozen: running statistics in train mode
        seq.fc.requires_grad_(False)    # untrainable
        model = normd.from_torch(self.c, seq, [5], optimizer={"sgd": {"lr": 0.1}},
                                 id="interop-flags")
        self.created.append(model.id)
        self.assertEqual(model.mode, pb.MODE_TRAIN)
        options = {o.layer: (o.frozen, o.trainable) for o in model.layer_options}
        self.assertEqual(options, {"fc": (False, False), "bn": (True, True), "fc2": (False, True),
                                   "bn2": (False, True), "head": (False, True)})
        # A train-mode forward: the frozen layer normalises with its running statistics.
        served = self.c.forward(model.id, x.numpy()).output
        with torch.no_grad():
            expected = seq(x).numpy()
        self.assertLessEqual(rel_err(served, expected), TOL)
        back = normd.to_torch(self.c, model.id)
        self.assertTrue(back.training)
        self.assertFalse(back[1].training)  # to_torch numbers the children
        self.assertTrue(back[4].training)
        self.assertFalse(any(p.requires_grad for p in back[0].parameters()))
        self.assertTrue(all(p.requires_grad for p in back[5].parameters()))
        # Weights trained only partly: a mixed module cannot be expressed per layer.
        seq.head.bias.requires_grad_(False)
        with self.assertRaises(ValueError):
            normd.from_torch(self.c, seq, [5], id="interop-mixed")

    def test_fold_to_torch_matches_fuse(self):
        from torch.nn.utils.fusion import fuse_conv_bn_eval
        seq = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                            nn.Flatten(), nn.Linear(6 * 8 * 8, 4))
        x = torch.randn(16, 1, 8, 8)
        warm_up(seq, x)
        model = normd.from_torch(self.c, seq, [1, 8, 8], id="interop-fold")
        self.created.append(model.id)
        result = self.c.fold_batch_norm(model.id)
        self.assertIsNone(result.model)
        folded = result.to_torch()
        self.assertEqual(len(folded), 4)
        fused = fuse_conv_bn_eval(seq[0], seq[1])
        self.assertLessEqual(rel_err(folded[0].weight.detach(), fused.weight.detach()), 1e-6)
        self.assertLessEqual(rel_err(folded[0].bias.detach(), fused.bias.detach()), 1e-6)
        with torch.no_grad():
            out, expected = folded(x).numpy(), seq(x).numpy()
        self.assertLessEqual(np.abs(out - expected).max(), 1e-5)

    def test_normd_to_torch(self):
        """A model made and trained in normd runs identically in PyTorch."""
        spec = {
            "input_shape": [10],
            "layers": [{"linear": {"in_features": 10, "out_features": 24}},
                       {"batch_norm1d": {"num_features": 24, "momentum": 0.2, "eps": 1e-3}},
                       {"relu": {}},
                       {"linear": {"in_features": 24, "out_features": 3}}],
            "loss": "LOSS_CROSS_ENTROPY", "optimizer": {"adam": {"lr": 0.01}}, "seed": 5}
        mid = self.c.create_model(spec, id="interop-from-normd").id
        self.created.append(mid)
        rng = np.random.default_rng(0)
        for _ in range(10):
            x = rng.normal(1.0, 2.0, size=(32, 10)).astype(np.float32)
            self.c.train_step(mid, x, labels=rng.integers(0, 3, 32))
        self.c.set_mode(mid, "eval")
        seq = normd.to_torch(self.c, mid)
        self.assertIsInstance(seq[1], nn.BatchNorm1d)
        self.assertAlmostEqual(seq[1].momentum, 0.2)
        self.assertEqual(seq[1].eps, 1e-3)
        self.assertEqual(int(seq[1].num_batches_tracked), 10)
        x = rng.normal(1.0, 2.0, size=(50, 10)).astype(np.float32)
        with torch.no_grad():
            expected = seq(torch.from_numpy(x)).numpy()
        err = rel_err(self.c.predict(mid, x), expected)
        print(f"normd -> torch: relative error {err:.2e}")
        self.assertLessEqual(err, TOL)

    def test_resnet_round_trip(self):
        """Residual blocks (a BasicBlock with a stride-2 projection, a Bottleneck, a
        depthwise-separable block, a nested block), grouped convolution and global average
        pooling: torch -> normd -> torch with identical state_dict keys and values."""
        RB = normd.ResidualBlock
        seq = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            RB([nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
                nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)],
               [nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16)]),
            nn.ReLU(),
            RB([nn.Conv2d(16, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, momentum=None),
                nn.ReLU(), nn.Conv2d(4, 16, 1, bias=False), nn.BatchNorm2d(16)]),
            nn.ReLU(),
            RB([nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                nn.ReLU(), RB([nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)])]),
            nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(16, 10))
        x = torch.randn(32, 3, 8, 8)
        warm_up(seq, x)
        expected, served, again = self.round_trip(seq, [3, 8, 8], x, "interop-resnet")
        err = rel_err(served, expected)
        print(f"ResNet: normd vs torch relative error {err:.2e}")
        self.assertLessEqual(err, TOL)
        np.testing.assert_array_equal(again, expected)
        keys = list(self.c.get_state("interop-resnet").keys())
        self.assertEqual(keys, list(seq.state_dict().keys()))
        self.assertIn("7.body.3.body.1.running_mean", keys)
        model = self.c.get_model("interop-resnet")
        block = model.spec.layers[3].residual
        self.assertEqual(len(block.body), 5)
        self.assertEqual(len(block.shortcut), 2)
        self.assertEqual(model.spec.layers[7].residual.body[0].conv2d.groups, 16)
        self.assertTrue(model.spec.layers[8].HasField("adaptive_avg_pool2d"))
        self.assertEqual([b.layer for b in model.batch_norms][:4],
                         ["1", "3.body.1", "3.body.4", "3.shortcut.1"])

    def test_resnet_named_layers_options_and_training(self):
        """Named blocks and layers keep their torch names as labels; frozen and untrainable
        nested layers round-trip; one train step on each side gives the same buffers."""
        from collections import OrderedDict
        RB = normd.ResidualBlock
        block = RB([nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                    nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)])
        block.body = nn.Sequential(OrderedDict(
            [("conv1", block.body[0]), ("bn1", block.body[1]), ("relu", block.body[2]),
             ("conv2", block.body[3]), ("bn2", block.body[4])]))
        seq = nn.Sequential(OrderedDict([
            ("stem", nn.Conv2d(2, 4, 3, padding=1, bias=False)), ("bn", nn.BatchNorm2d(4)),
            ("layer1", block), ("act", nn.ReLU()), ("pool", nn.AdaptiveAvgPool2d(1)),
            ("flat", nn.Flatten()), ("head", nn.Linear(4, 3))]))
        x = torch.randn(16, 2, 6, 6)
        warm_up(seq, x)
        seq.train()
        seq.layer1.body.bn2.eval()                  # frozen, inside the block
        seq.layer1.body.conv1.requires_grad_(False)  # untrainable, inside the block
        model = normd.from_torch(self.c, seq, [2, 6, 6], optimizer={"sgd": {"lr": 0.05}},
                                 id="interop-resnet-named")
        self.created.append(model.id)
        body = model.spec.layers[2].residual.body
        self.assertEqual([l.name for l in body],
                         ["layer1.body.conv1", "layer1.body.bn1", "layer1.body.relu",
                          "layer1.body.conv2", "layer1.body.bn2"])
        options = {o.layer: (o.frozen, o.trainable) for o in model.layer_options}
        self.assertEqual(options["layer1.body.bn2"], (True, True))
        self.assertEqual(options["layer1.body.conv1"], (False, False))
        self.assertEqual(options["layer1.body.bn1"], (False, True))
        # normd's state names are its paths whatever the torch names.
        state = self.c.get_state(model.id)
        self.assertIn("2.body.4.running_var", state)
        np.testing.assert_array_equal(state["2.body.4.running_var"],
                                      seq.layer1.body.bn2.running_var.numpy())
        # A train-mode step: batch statistics, the frozen layer's running ones.
        labels = torch.randint(0, 3, (16,))
        self.c.train_step(model.id, x.numpy(), labels=labels.numpy())
        with torch.no_grad():
            seq(x)
        state = self.c.get_state(model.id)
        for name, torch_bn in (("2.body.1", seq.layer1.body.bn1), ("1", seq.bn)):
            self.assertLessEqual(rel_err(state[f"{name}.running_mean"],
                                         torch_bn.running_mean.numpy()), 1e-5, name)
            self.assertLessEqual(rel_err(state[f"{name}.running_var"],
                                         torch_bn.running_var.numpy()), 1e-5, name)
        np.testing.assert_array_equal(state["2.body.4.running_mean"],
                                      seq.layer1.body.bn2.running_mean.numpy())
        back = normd.to_torch(self.c, model.id)
        self.assertTrue(back.training)
        self.assertFalse(back[2].body[4].training)
        self.assertTrue(back[2].body[1].training)
        self.assertFalse(any(p.requires_grad for p in back[2].body[0].parameters()))
        self.assertTrue(all(p.requires_grad for p in back[2].body[3].parameters()))
        self.assertIsInstance(back[2], normd.ResidualBlock)

    def test_unsupported_modules(self):
        for seq in (nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=1)),
                    nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2)),
                    nn.Sequential(nn.Conv2d(1, 2, (3, 2))),
                    nn.Sequential(nn.GELU(approximate="tanh")),
                    nn.Sequential(nn.AdaptiveAvgPool2d((2, 2))),
                    nn.Sequential(normd.ResidualBlock([nn.ReLU(), nn.Softmax(dim=1)]))):
            with self.assertRaises(ValueError):
                normd.from_torch(self.c, seq, [1, 8, 8], id="interop-unsupported")
        ids = [m.id for m in self.c.list_models()]
        self.assertNotIn("interop-unsupported", ids)

    def test_recipe_from_torch_trains_like_torch(self):
        """A torch training recipe — SGD with momentum in two parameter groups (no weight decay
        on norm parameters and biases), SequentialLR(LinearLR, CosineAnnealingLR),
        clip_grad_norm_ and CrossEntropyLoss(label_smoothing) — carried over by from_torch,
        then the same 30 steps on both sides: every step's lr and pre-clipping gradient norm,
        and the final state, agree."""
        import warnings
        seq = nn.Sequential(nn.Linear(10, 24, bias=False), nn.BatchNorm1d(24), nn.ReLU(),
                            nn.Linear(24, 24), nn.LayerNorm(24), nn.Tanh(), nn.Linear(24, 4))
        seq.train()
        norm_params = {id(p) for m in seq.modules() if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm))
                       for p in m.parameters(recurse=False)}
        exempt = [p for n, p in seq.named_parameters() if id(p) in norm_params or
                  n.endswith(".bias")]
        others = [p for p in seq.parameters() if all(p is not q for q in exempt)]
        opt = torch.optim.SGD([{"params": others}, {"params": exempt, "weight_decay": 0.0}],
                              lr=0.05, momentum=0.9, weight_decay=1e-3)
        sched = torch.optim.lr_scheduler
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            scheduler = sched.SequentialLR(
                opt, [sched.LinearLR(opt, start_factor=0.2, total_iters=4),
                      sched.CosineAnnealingLR(opt, T_max=26, eta_min=1e-3)], milestones=[4])
        criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        model = normd.from_torch(self.c, seq, [10], loss=criterion, optimizer=opt,
                                 lr_scheduler=scheduler, max_grad_norm=1.0,
                                 no_weight_decay_on_norm_and_bias=True, id="interop-recipe")
        self.created.append(model.id)
        o = model.spec.optimizer
        self.assertEqual((o.lr_schedule.warmup.steps, o.lr_schedule.warmup.start_factor),
                         (4, 0.2))
        self.assertEqual((o.lr_schedule.cosine.t_max, o.lr_schedule.cosine.eta_min), (26, 1e-3))
        self.assertEqual(o.clip_grad_norm.max_norm, 1.0)
        self.assertTrue(o.no_weight_decay_on_norm_and_bias)
        self.assertEqual(model.spec.loss_options.label_smoothing, 0.1)

        rng = np.random.default_rng(5)
        worst_lr = worst_norm = 0.0
        clipped = 0
        for step in range(30):
            x = rng.normal(size=(16, 10)).astype(np.float32) * 2
            y = rng.integers(0, 4, 16)
            r = self.c.train_step(model.id, x, labels=y)
            opt.zero_grad()
            loss = criterion(seq(torch.from_numpy(x)), torch.from_numpy(y))
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(seq.parameters(), 1.0).item()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            worst_lr = max(worst_lr, abs(r.learning_rate - lr) / lr)
            worst_norm = max(worst_norm, abs(r.grad_norm - norm) / norm)
            clipped += norm > 1.0
            self.assertAlmostEqual(r.loss, loss.item(), delta=1e-5 * loss.item())
        state = self.c.get_state(model.id)
        worst_state = max(rel_err(state[k], v.numpy()) for k, v in seq.state_dict().items()
                          if not k.endswith("num_batches_tracked"))
        print(f"recipe from torch: lr rel err {worst_lr:.1e}, grad norm {worst_norm:.1e}, "
              f"state {worst_state:.1e} after 30 steps ({clipped} clipped)")
        self.assertGreater(clipped, 0)
        self.assertLess(worst_lr, 1e-7)  # the float32 rounding of the base lr on the wire
        self.assertLess(worst_norm, 1e-5)
        self.assertLess(worst_state, 1e-4)

    def test_lr_schedule_from_torch_refuses_what_it_cannot_express(self):
        sched = torch.optim.lr_scheduler
        opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
        self.assertEqual(normd.lr_schedule_from_torch(sched.StepLR(opt, 7, gamma=0.3)),
                         pb.LrScheduleSpec(step=pb.StepLRSpec(step_size=7, gamma=0.3)))
        self.assertEqual(normd.lr_schedule_from_torch(sched.LinearLR(opt, 0.5, total_iters=3)),
                         pb.LrScheduleSpec(warmup=pb.LinearWarmupSpec(steps=3, start_factor=0.5)))
        for make in (lambda: sched.ExponentialLR(opt, 0.9),
                     lambda: sched.LinearLR(opt, 0.5, end_factor=0.5, total_iters=3),
                     lambda: sched.SequentialLR(opt, [sched.LinearLR(opt, 0.5, total_iters=3),
                                                      sched.StepLR(opt, 2)], milestones=[5]),
                     lambda: sched.SequentialLR(opt, [sched.StepLR(opt, 2),
                                                      sched.StepLR(opt, 3)], milestones=[2])):
            with self.assertRaises(ValueError):
                normd.lr_schedule_from_torch(make())
        stepped = sched.StepLR(opt, 2)
        opt.step()
        stepped.step()
        with self.assertRaises(ValueError) as ctx:
            normd.lr_schedule_from_torch(stepped)
        self.assertIn("already stepped", str(ctx.exception))

    def test_failed_set_state_leaves_no_model(self):
        seq = nn.Sequential(nn.Linear(4, 3))
        with torch.no_grad():
            seq[0].weight[0, 0] = float("nan")
        with self.assertRaises(normd.NormdError):
            normd.from_torch(self.c, seq, [4], id="interop-nan")
        self.assertNotIn("interop-nan", [m.id for m in self.c.list_models()])


if __name__ == "__main__":
    unittest.main(verbosity=2)
