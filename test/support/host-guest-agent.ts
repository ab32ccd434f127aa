// A real qemu-ga run on the host, standing in for the guest's: in its own mount namespace and chroot, where the
// only file system it can see (and so freeze) is a small ext4 image of ours. Freezing then really freezes a file
// system, and never one of the host's. A freeze hook logs "freeze"/"thaw" to `events()`, in order.
// For a libvirt domain, `relaySocketPath` serves the agent channel (`<channel type='unix'><source mode='connect'>`):
// QEMU's own connection (the first) is held and ignored; libvirt's (any later one) is piped to qemu-ga,
// reconnecting when qemu-ga was restarted, as libvirt keeps its agent connection for the domain's life.
import { spawn, type ChildProcess } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { dirname, join } from 'node:path';
import { exec } from '../../src/core/exec.ts';

export type AgentBehaviour = 'freezes' | 'refuses-freeze';

export class HostGuestAgent {
  #agent: ChildProcess | undefined;
  #relay: Server | undefined;
  readonly #relayed = new Set<Socket>();

  private constructor(
    readonly dir: string,
    /** Where qemu-ga listens, seen from the host. */
    readonly socketPath: string,
    /** Where QEMU and libvirt connect for the domain's agent channel. */
    readonly relaySocketPath: string,
  ) {}

  /** Prepares the chroot (qemu-ga, its libraries, busybox for the hook, an ext4 image) and the relay; no agent runs yet. */
  static async prepare(dir: string): Promise<HostGuestAgent> {
    const root = join(dir, 'root');
    for (const folder of ['bin', 'proc', 'data', 'run']) mkdirSync(join(root, folder), { recursive: true });
    copyFileSync('/usr/sbin/qemu-ga', join(root, 'bin', 'qemu-ga'));
    copyFileSync('/bin/busybox', join(root, 'bin', 'busybox'));
    await exec('chmod', ['755', join(root, 'bin', 'qemu-ga'), join(root, 'bin', 'busybox')]);
    const { stdout } = await exec('ldd', ['/usr/sbin/qemu-ga']);
    for (const library of stdout.match(/\/lib\S*/g) ?? []) {
      mkdirSync(join(root, dirname(library)), { recursive: true });
      copyFileSync(library, join(root, library));
    }
    writeFileSync(join(root, 'bin', 'freeze-hook'), '#!/bin/busybox sh\necho "$1" >> /run/freeze-events\n', { mode: 0o755 });
    await exec('truncate', ['-s', '16M', join(dir, 'guest-fs.img')]);
    await exec('mkfs.ext4', ['-q', '-F', join(dir, 'guest-fs.img')]);
    const agent = new HostGuestAgent(dir, join(root, 'run', 'qga.sock'), join(dir, 'agent-channel.sock'));
    await agent.#startRelay();
    return agent;
  }

  /** Starts qemu-ga (stopping one that runs); `refuses-freeze` blocks guest-fsfreeze-freeze, as an admin may. */
  async start(behaviour: AgentBehaviour): Promise<void> {
    await this.stop();
    rmSync(this.socketPath, { force: true });
    const root = join(this.dir, 'root');
    const blocked = behaviour === 'refuses-freeze' ? ' -b guest-fsfreeze-freeze,guest-fsfreeze-freeze-list' : '';
    // unshare without --fork and `exec chroot`: the PID we hold is qemu-ga's own; its namespace (and the loop
    // mount in it) ends with it.
    const script = `mount -t proc proc ${root}/proc && mount -o loop ${this.dir}/guest-fs.img ${root}/data && exec chroot ${root} /bin/qemu-ga -m unix-listen -p /run/qga.sock -t /run -f /run/qga.pid -F/bin/freeze-hook${blocked}`;
    const agent = spawn('unshare', ['--mount', '--propagation', 'private', 'sh', '-c', script], { stdio: ['ignore', 'ignore', 'pipe'] });
    let errors = '';
    agent.stderr!.on('data', (chunk: Buffer) => (errors += chunk.toString()));
    this.#agent = agent;
    for (let attempt = 0; !existsSync(this.socketPath); attempt++) {
      if (agent.exitCode !== null || attempt > 250) throw new Error(`qemu-ga did not start: ${errors}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }

  /** Ends qemu-ga by its PID (SIGTERM: it thaws what it froze on the way out). */
  async stop(): Promise<void> {
    const agent = this.#agent;
    this.#agent = undefined;
    if (!agent || agent.exitCode !== null || agent.signalCode !== null) return;
    const exited = new Promise((resolve) => agent.once('exit', resolve));
    process.kill(agent.pid!, 'SIGTERM');
    await exited;
  }

  get running(): boolean {
    return this.#agent !== undefined && this.#agent.exitCode === null && this.#agent.signalCode === null;
  }

  /** What the freeze hook saw, in order: 'freeze' | 'thaw'. */
  events(): string[] {
    const file = join(this.dir, 'root', 'run', 'freeze-events');
    return existsSync(file) ? readFileSync(file, 'utf8').split('\n').filter(Boolean) : [];
  }

  async close(): Promise<void> {
    await this.stop();
    for (const socket of this.#relayed) socket.destroy();
    await new Promise((resolve) => (this.#relay ? this.#relay.close(resolve) : resolve(undefined)));
  }

  async #startRelay(): Promise<void> {
    let connections = 0;
    this.#relay = createServer((downstream) => {
      this.#relayed.add(downstream);
      downstream.on('close', () => this.#relayed.delete(downstream));
      downstream.on('error', () => undefined);
      // QEMU's chardev connects first, when the domain starts: the guest side of the port, where no agent runs.
      if (connections++ === 0) {
        downstream.resume();
        return;
      }
      let upstream: Socket | undefined;
      downstream.on('data', (bytes: Buffer) => {
        if (!upstream || upstream.destroyed) {
          if (!existsSync(this.socketPath) || !this.running) return; // no agent: the command goes unanswered
          const connection = createConnection(this.socketPath);
          connection.on('data', (reply: Buffer) => downstream.write(reply));
          connection.on('error', () => connection.destroy());
          upstream = connection;
        }
        upstream.write(bytes);
      });
      downstream.on('close', () => upstream?.destroy());
    });
    await new Promise<void>((resolve, reject) => {
      this.#relay!.once('error', reject);
      this.#relay!.listen(this.relaySocketPath, resolve);
    });
  }
}
