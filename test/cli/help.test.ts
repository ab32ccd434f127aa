// What --help and README promise (issue 11, "CLI that keeps its word"): every command shows examples, restore
// says when --to is a folder, the schedule format is the same in help, README and validation, and backup
// defaults to the mode jobs default to. No VM needed.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Command } from 'commander';
import { createProgram } from '../../src/cli/program.ts';
import { jobDefaults, scheduleFormat } from '../../src/jobs/job-definition.ts';
import { makeWorkspace, runCli } from '../support/workspace.ts';

/** Runs of whitespace (help and README both wrap lines) as one space. */
const flat = (text: string) => text.replace(/\s+/g, ' ');

/** `command`'s full --help text, as `snapshift … --help` prints it (examples are added after the usage). */
function helpOf(command: Command): string {
  let text = '';
  command.configureOutput({ writeOut: (chunk) => (text += chunk), writeErr: (chunk) => (text += chunk) });
  command.outputHelp();
  return text;
}

/** Every command under `command`, with its path of names ("repo key add"). */
function* commandsUnder(command: Command, path: string[] = []): Generator<[string, Command]> {
  for (const sub of command.commands) {
    const subPath = [...path, sub.name()];
    yield [subPath.join(' '), sub];
    yield* commandsUnder(sub, subPath);
  }
}

describe('--help and README keep their word', () => {
  let workspace: Awaited<ReturnType<typeof makeWorkspace>>;
  let readme: string;
  before(async () => {
    workspace = await makeWorkspace('cli-help');
    readme = await readFile('README.md', 'utf8');
  });
  after(async () => {
    await workspace?.cleanup();
  });
  const env = () => ({ SNAPSHIFT_HOME: join(workspace.dir, 'home') });

  test('every command, groups and the program itself included, ends its --help with an example', () => {
    const program = createProgram();
    const all = [['snapshift', program] as [string, Command], ...commandsUnder(program)];
    assert.ok(all.length > 40, `walked ${all.length} commands`);
    const without = all.filter(([, command]) => !/^Examples?:\n {2}snapshift /m.test(helpOf(command))).map(([name]) => name);
    assert.deepEqual(without, [], 'commands whose --help has no "Example:" block');
  });

  test('bin/snapshift shows those examples, through --help and through "help"', async () => {
    for (const args of [['repo', 'info', '--help'], ['help', 'repo', 'info'], ['job', 'run', '--help'], ['--help']]) {
      const result = await runCli(args, env());
      assert.equal(result.status, 0, `${args.join(' ')}: ${result.stderr}`);
      assert.match(result.stdout, /^Examples?:$/m, args.join(' '));
    }
  });

  test('restore --help: one disk goes to a file; several disks, or --all-disks, need a folder', async () => {
    const help = flat((await runCli(['restore', '--help'], env())).stdout);
    assert.match(help, /--to <path> target file for one disk; a folder .* when the restore point has several disks or with --all-disks/);
    assert.match(help, /--all-disks restore every disk into the folder --to/);
    assert.match(help, /snapshift restore vm1 --all-disks --to /);
  });

  test('--schedule: help and README say 5 fields or 6 with seconds first, and job create takes exactly those', async () => {
    assert.ok(flat(helpOf(createProgram().commands.find((c) => c.name() === 'job')!.commands.find((c) => c.name() === 'create')!)).includes(flat(scheduleFormat)));
    for (const args of [['job', 'create', '--help'], ['job', 'edit', '--help']]) {
      assert.ok(flat((await runCli(args, env())).stdout).includes(`--schedule <cron> cron schedule: ${scheduleFormat};`), args.join(' '));
    }
    assert.ok(flat(readme).includes(scheduleFormat), `README says "${scheduleFormat}"`);

    const create = (name: string, schedule: string) => runCli(['job', 'create', name, '--vm', 'vm1', '--repo', join(workspace.dir, 'repo'), '--schedule', schedule], env());
    for (const [name, schedule] of [['five', '0 22 * * *'], ['six', '0 0 22 * * *'], ['nickname', '@daily']] as const) {
      const result = await create(name, schedule);
      assert.equal(result.status, 0, `${schedule}: ${result.stderr}`);
    }
    const seven = await create('seven', '0 0 22 * * * 2030');
    assert.equal(seven.status, 64);
    assert.equal(seven.stderr, `snapshift: invalid job: job seven: schedule "0 0 22 * * * 2030" has 7 field(s); a schedule has ${scheduleFormat}\n`);
    const four = await create('four', '0 22 * *');
    assert.equal(four.status, 64);
    assert.match(four.stderr, /has 4 field\(s\); a schedule has 5 fields/);
  });

  test('backup and jobs default to the same mode: storage-snapshot, failing over to regular', async () => {
    assert.equal(jobDefaults.mode, 'storage-snapshot');
    assert.equal(jobDefaults.failoverToRegular, true);
    const backupHelp = flat((await runCli(['backup', '--help'], env())).stdout);
    assert.match(backupHelp, /--mode <mode> storage-snapshot \(falls back to regular mode, saying why, .*\), regular, or fleecing \(.*\); jobs default to the same \(default: "storage-snapshot"\)/);
    assert.match(backupHelp, /--no-failover-to-regular/);

    const created = await runCli(['job', 'create', 'defaults', '--vm', 'vm1', '--repo', join(workspace.dir, 'repo')], env());
    assert.equal(created.status, 0, created.stderr);
    const shown = JSON.parse((await runCli(['job', 'show', 'defaults', '--json'], env())).stdout) as { mode: string; failoverToRegular: boolean };
    assert.equal(shown.mode, 'storage-snapshot');
    assert.equal(shown.failoverToRegular, true);
    assert.match(flat(readme), /`backup` and jobs both default to `storage-snapshot` with failover to regular mode/);
  });

  test("README's exit-status table names every status the CLI uses, 3 for backup, restore and job run, and hunt's 2", () => {
    const table = new Map(
      [...readme.matchAll(/^\| (\d+) \| (.*) \|$/gm)].map((match) => [Number(match[1]), match[2]!]),
    );
    assert.deepEqual([...table.keys()], [0, 1, 2, 3, 64]);
    assert.match(table.get(3)!, /`backup`, `restore` and `job run`/);
    assert.match(table.get(2)!, /`hunt` that left .* in place/);
    assert.match(table.get(64)!, /usage error/);
  });
});
