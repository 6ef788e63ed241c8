"""The fixed reference for speed and correctness: CleanRL's eager SAC update (sac_continuous_action.py).

Two separate critic modules, plain `torch.optim.Adam`, `alpha` read back with `.item()`, the
losses of CleanRL. Nothing here is tuned; the benchmark and the equivalence test compare the
project's update path against it.

The temperature is autotuned, as in CleanRL's runs, and starts where CleanRL starts it: log alpha
= 0, alpha = 1.0 (`alpha=None`). The project's scripts start at --alpha 0.2 (the paper's Table 6,
a difference from CleanRL), so a comparison with the project's learner passes that value as
`alpha`.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_STD_MAX = 2
LOG_STD_MIN = -5


def initial_log_alpha(alpha, device):
    """CleanRL's autotuned start, log alpha = 0 (alpha 1.0), unless an initial `alpha` is given."""
    value = 0.0 if alpha is None else float(np.log(alpha))
    return torch.tensor([value], requires_grad=True, device=device)


class SoftQNetwork(nn.Module):
    def __init__(self, obs_dim, act_dim, hidden):
        super().__init__()
        dims = [obs_dim + act_dim] + list(hidden)
        self.fcs = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], 1)

    def forward(self, x, a):
        x = torch.cat([x, a], 1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return self.out(x)


class Actor(nn.Module):
    def __init__(self, obs_dim, act_dim, hidden):
        super().__init__()
        dims = [obs_dim] + list(hidden)
        self.fcs = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))
        self.fc_mean = nn.Linear(dims[-1], act_dim)
        self.fc_logstd = nn.Linear(dims[-1], act_dim)
        self.register_buffer("action_scale", torch.ones(act_dim))
        self.register_buffer("action_bias", torch.zeros(act_dim))

    def forward(self, x):
        for fc in self.fcs:
            x = F.relu(fc(x))
        mean = self.fc_mean(x)
        log_std = torch.tanh(self.fc_logstd(x))
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)
        return mean, log_std

    def get_action(self, x):
        mean, log_std = self(x)
        std = log_std.exp()
        normal = torch.distributions.Normal(mean, std)
        x_t = normal.rsample()
        y_t = torch.tanh(x_t)
        action = y_t * self.action_scale + self.action_bias
        log_prob = normal.log_prob(x_t)
        log_prob -= torch.log(self.action_scale * (1 - y_t.pow(2)) + 1e-6)
        log_prob = log_prob.sum(1, keepdim=True)
        mean = torch.tanh(mean) * self.action_scale + self.action_bias
        return action, log_prob, mean


class CleanRLSAC:
    """CleanRL's update, step for step: one critic update; every `policy_frequency` steps that
    many actor and alpha updates; soft target update every step."""

    def __init__(self, obs_dim, act_dim, hidden, device, q_lr=1e-3, policy_lr=3e-4, gamma=0.99, tau=0.005,
                 policy_frequency=2, alpha=None):
        self.actor = Actor(obs_dim, act_dim, hidden).to(device)
        self.qf1 = SoftQNetwork(obs_dim, act_dim, hidden).to(device)
        self.qf2 = SoftQNetwork(obs_dim, act_dim, hidden).to(device)
        self.qf1_target = SoftQNetwork(obs_dim, act_dim, hidden).to(device)
        self.qf2_target = SoftQNetwork(obs_dim, act_dim, hidden).to(device)
        self.qf1_target.load_state_dict(self.qf1.state_dict())
        self.qf2_target.load_state_dict(self.qf2.state_dict())
        self.q_optimizer = torch.optim.Adam(list(self.qf1.parameters()) + list(self.qf2.parameters()), lr=q_lr)
        self.actor_optimizer = torch.optim.Adam(list(self.actor.parameters()), lr=policy_lr)
        self.target_entropy = -float(act_dim)
        self.log_alpha = initial_log_alpha(alpha, device)
        self.alpha = self.log_alpha.exp().item()
        self.a_optimizer = torch.optim.Adam([self.log_alpha], lr=q_lr)
        self.gamma, self.tau, self.policy_frequency = gamma, tau, policy_frequency

    def update(self, global_step, observations, actions, rewards, next_observations, dones):
        with torch.no_grad():
            next_state_actions, next_state_log_pi, _ = self.actor.get_action(next_observations)
            qf1_next_target = self.qf1_target(next_observations, next_state_actions)
            qf2_next_target = self.qf2_target(next_observations, next_state_actions)
            min_qf_next_target = torch.min(qf1_next_target, qf2_next_target) - self.alpha * next_state_log_pi
            next_q_value = rewards.flatten() + (1 - dones.flatten()) * self.gamma * (min_qf_next_target).view(-1)
        qf1_a_values = self.qf1(observations, actions).view(-1)
        qf2_a_values = self.qf2(observations, actions).view(-1)
        qf1_loss = F.mse_loss(qf1_a_values, next_q_value)
        qf2_loss = F.mse_loss(qf2_a_values, next_q_value)
        qf_loss = qf1_loss + qf2_loss
        self.q_optimizer.zero_grad()
        qf_loss.backward()
        self.q_optimizer.step()
        losses = {"qf1_loss": qf1_loss.item(), "qf2_loss": qf2_loss.item()}
        if global_step % self.policy_frequency == 0:
            for _ in range(self.policy_frequency):
                pi, log_pi, _ = self.actor.get_action(observations)
                qf1_pi = self.qf1(observations, pi)
                qf2_pi = self.qf2(observations, pi)
                min_qf_pi = torch.min(qf1_pi, qf2_pi)
                actor_loss = ((self.alpha * log_pi) - min_qf_pi).mean()
                self.actor_optimizer.zero_grad()
                actor_loss.backward()
                self.actor_optimizer.step()
                with torch.no_grad():
                    _, log_pi, _ = self.actor.get_action(observations)
                alpha_loss = (-self.log_alpha.exp() * (log_pi + self.target_entropy)).mean()
                self.a_optimizer.zero_grad()
                alpha_loss.backward()
                self.a_optimizer.step()
                self.alpha = self.log_alpha.exp().item()
                losses["actor_loss"] = actor_loss.item()
        for param, target_param in zip(self.qf1.parameters(), self.qf1_target.parameters()):
            target_param.data.copy_(self.tau * param.data + (1 - self.tau) * target_param.data)
        for param, target_param in zip(self.qf2.parameters(), self.qf2_target.parameters()):
            target_param.data.copy_(self.tau * param.data + (1 - self.tau) * target_param.data)
        return losses


class CleanRLSACAtari:
    """CleanRL's sac_atari.py update, step for step, on the project's Atari networks: eager,
    plain Adam (eps 1e-4), alpha read back with `.item()`, the target copy as a parameter loop."""

    def __init__(self, num_actions, channels, hidden, device, lr=1e-4, gamma=0.99, tau=1.0,
                 target_entropy_scale=0.89, alpha=None):
        from nbsp_sac_atari import Actor as AtariActor
        from nbsp_sac_atari import SoftQNetwork as AtariQNetwork

        self.actor = AtariActor(num_actions, channels, hidden).to(device)
        self.qf1, self.qf2, self.qf1_target, self.qf2_target = (
            AtariQNetwork(num_actions, channels, hidden).to(device) for _ in range(4))
        self.qf1_target.load_state_dict(self.qf1.state_dict())
        self.qf2_target.load_state_dict(self.qf2.state_dict())
        self.q_optimizer = torch.optim.Adam(list(self.qf1.parameters()) + list(self.qf2.parameters()), lr=lr, eps=1e-4)
        self.actor_optimizer = torch.optim.Adam(list(self.actor.parameters()), lr=lr, eps=1e-4)
        self.target_entropy = -target_entropy_scale * torch.log(1 / torch.tensor(num_actions)).item()
        self.log_alpha = initial_log_alpha(alpha, device)
        self.alpha = self.log_alpha.exp().item()
        self.a_optimizer = torch.optim.Adam([self.log_alpha], lr=lr, eps=1e-4)
        self.gamma, self.tau = gamma, tau

    def update(self, observations, actions, rewards, next_observations, dones, update_target):
        with torch.no_grad():
            next_state_log_pi = F.log_softmax(self.actor(next_observations), dim=1)
            next_state_action_probs = next_state_log_pi.exp()
            qf1_next_target = self.qf1_target(next_observations)
            qf2_next_target = self.qf2_target(next_observations)
            min_qf_next_target = next_state_action_probs * (
                torch.min(qf1_next_target, qf2_next_target) - self.alpha * next_state_log_pi)
            min_qf_next_target = min_qf_next_target.sum(dim=1)
            next_q_value = rewards.flatten() + (1 - dones.flatten()) * self.gamma * min_qf_next_target
        qf1_a_values = self.qf1(observations).gather(1, actions.long().view(-1, 1)).view(-1)
        qf2_a_values = self.qf2(observations).gather(1, actions.long().view(-1, 1)).view(-1)
        qf1_loss = F.mse_loss(qf1_a_values, next_q_value)
        qf2_loss = F.mse_loss(qf2_a_values, next_q_value)
        qf_loss = qf1_loss + qf2_loss
        self.q_optimizer.zero_grad()
        qf_loss.backward()
        self.q_optimizer.step()
        log_pi = F.log_softmax(self.actor(observations), dim=1)
        action_probs = log_pi.exp()
        with torch.no_grad():
            min_qf_values = torch.min(self.qf1(observations), self.qf2(observations))
        actor_loss = (action_probs * ((self.alpha * log_pi) - min_qf_values)).mean()
        self.actor_optimizer.zero_grad()
        actor_loss.backward()
        self.actor_optimizer.step()
        alpha_loss = (action_probs.detach() * (-self.log_alpha.exp() * (log_pi + self.target_entropy).detach())).mean()
        self.a_optimizer.zero_grad()
        alpha_loss.backward()
        self.a_optimizer.step()
        self.alpha = self.log_alpha.exp().item()
        if update_target:
            for q, q_target in ((self.qf1, self.qf1_target), (self.qf2, self.qf2_target)):
                for param, target_param in zip(q.parameters(), q_target.parameters()):
                    target_param.data.copy_(self.tau * param.data + (1 - self.tau) * target_param.data)
        return {"qf1_loss": qf1_loss.item(), "qf2_loss": qf2_loss.item(), "actor_loss": actor_loss.item()}
