import type { Command } from 'commander';
import { SnapshiftError } from '../core/errors.ts';
import { Lab, defaultLabDir, formatByteSize, type LabVm } from '../lab/index.ts';

interface DemoOptions {
  dir: string;
  keep?: boolean;
  seconds: string;
  rate: string;
}

/** What the demo's steps share. Later steps (backups) add their own fields here. */
interface DemoContext {
  options: { dir: string; watchSeconds: number; rateMiBps: number };
  lab?: Lab;
  vm?: LabVm;
}

/** One visible step of the demo. New steps (backup, restore) are added to `demoSteps` in order. */
interface DemoStep {
  title: string;
  run(context: DemoContext): Promise<string | void>;
}

const demoVmName = 'demo';

const demoSteps: DemoStep[] = [
  {
    title: 'bring the lab up (btrfs and XFS datastores on loop files)',
    async run(context) {
      context.lab = await Lab.up({ dir: context.options.dir });
      const status = await context.lab.status();
      return status.datastores.map((d) => `${d.kind} on ${d.mountPoint} (${d.loopDevice})`).join(', ');
    },
  },
  {
    title: 'prepare the guest kernel (Debian cloud kernel, downloaded once and cached)',
    async run(context) {
      const { kernel } = await need(context.lab, 'lab').guest();
      return `${kernel.kernelVersion}${kernel.downloadMs === undefined ? ' (cached)' : ` (downloaded in ${(kernel.downloadMs / 1000).toFixed(1)} s)`}`;
    },
  },
  {
    title: `create VM "${demoVmName}" with a qcow2 disk on the btrfs datastore`,
    async run(context) {
      const lab = need(context.lab, 'lab');
      // A lab kept by an earlier `demo --keep` may still have the VM: start from a fresh disk.
      if ((await lab.status()).vms.some((v) => v.name === demoVmName)) await lab.removeVm(demoVmName);
      const vm = await lab.createVm(demoVmName, { datastore: 'btrfs', sizeBytes: 1024 ** 3, fillBytes: 256 * 1024 ** 2 });
      return `${vm.diskPath}: ${formatByteSize(vm.sizeBytes)}, ${formatByteSize(vm.fillBytes)} of random data`;
    },
  },
  {
    title: 'boot the guest and start its steady writes',
    async run(context) {
      context.vm = await need(context.lab, 'lab').startVm(demoVmName, { rateMiBps: context.options.rateMiBps });
      return `pid ${context.vm.pid}, workload running after ${((context.vm.bootMs ?? 0) / 1000).toFixed(1)} s, writing ${context.options.rateMiBps} MiB/s`;
    },
  },
  {
    title: 'watch the guest write (heartbeat once a second)',
    async run(context) {
      const vm = need(context.vm, 'vm');
      const until = Date.now() + context.options.watchSeconds * 1000;
      let shown = (await vm.heartbeats()).length;
      while (Date.now() < until) {
        await new Promise((resolve) => setTimeout(resolve, 250));
        const heartbeats = await vm.heartbeats();
        for (const beat of heartbeats.slice(shown)) {
          console.log(`    guest up ${beat.uptimeS.toFixed(0).padStart(3)} s: ${String(beat.writes).padStart(6)} writes, ${String(beat.writtenMiB).padStart(4)} MiB written, ${beat.behind} behind, ${beat.errors} errors`);
        }
        shown = heartbeats.length;
        if (!(await vm.isRunning())) throw new SnapshiftError('LAB_VM_FAILED', 'the demo guest stopped unexpectedly');
      }
      const last = (await vm.heartbeats()).at(-1);
      return last ? `${last.writtenMiB} MiB written so far, still running` : 'no heartbeat seen';
    },
  },
];

/** `snapshift demo`: the lab, a real guest writing steadily, and (later) backups of it; torn down at the end. */
export function registerDemoCommand(program: Command): void {
  program
    .command('demo')
    .description('bring the lab up, boot a tiny guest that writes steadily, show it working, tear it all down (needs root)')
    .option('--dir <dir>', 'lab folder', defaultLabDir)
    .option('--keep', 'leave the lab and the running VM up at the end')
    .option('--seconds <n>', 'how long to watch the guest', '10')
    .option('--rate <MiBps>', 'guest write rate', '4')
    .action(async (options: DemoOptions) => {
      const watchSeconds = Number(options.seconds);
      const rateMiBps = Number(options.rate);
      if (!(watchSeconds >= 0) || !Number.isInteger(rateMiBps) || rateMiBps < 0) throw new SnapshiftError('BAD_ARGUMENT', '--seconds must be a number and --rate a whole number of MiB/s');
      await runDemo({ options: { dir: options.dir, watchSeconds, rateMiBps } }, options.keep === true);
    });
}

async function runDemo(context: DemoContext, keep: boolean): Promise<void> {
  const started = Date.now();
  let failed = false;
  // Ctrl-C must not leave a guest, mounts and loop devices behind: tear down from the state file, then exit.
  const onInterrupt = (): void => {
    console.log('\ninterrupted: taking the lab down');
    Lab.down(context.options.dir).then(
      () => process.exit(130),
      (error: unknown) => {
        console.error(`snapshift: lab down failed: ${error instanceof Error ? error.message : String(error)}`);
        process.exit(2);
      },
    );
  };
  process.once('SIGINT', onInterrupt);
  try {
    for (const [index, step] of demoSteps.entries()) {
      const stepStarted = Date.now();
      console.log(`[${index + 1}/${demoSteps.length}] ${step.title}`);
      const summary = await step.run(context);
      console.log(`    ${summary ? `${summary} ` : ''}(${((Date.now() - stepStarted) / 1000).toFixed(1)} s)`);
    }
  } catch (error) {
    failed = true;
    throw error;
  } finally {
    process.off('SIGINT', onInterrupt);
    if (keep && !failed) {
      console.log(`kept: lab in ${context.options.dir}, VM "${demoVmName}" running; remove it all with: bin/snapshift lab down --dir ${context.options.dir}`);
    } else {
      const downStarted = Date.now();
      // Down from the state file even when a step failed before `lab` was set (up itself cleans up, but a
      // later step may have made a VM).
      const report = await Lab.down(context.options.dir);
      if (report.wasUp) console.log(`lab down: ended ${report.endedPids.length} process(es), removed ${report.removedDatastores.join(' and ')} (${((Date.now() - downStarted) / 1000).toFixed(1)} s)`);
    }
    if (!failed) console.log(`demo done in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  }
}

function need<T>(value: T | undefined, what: string): T {
  if (value === undefined) throw new Error(`demo step order: no ${what} yet`);
  return value;
}
