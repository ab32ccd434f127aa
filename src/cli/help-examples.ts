import type { Command } from 'commander';

/**
 * Ends a command's --help with its examples (README: every command's --help has them; a test walks every
 * command to hold us to it). Each example is one command line, shown indented under "Example(s):".
 */
export function withExamples<C extends Command>(command: C, ...examples: string[]): C {
  return command.addHelpText('after', `\n${examples.length === 1 ? 'Example' : 'Examples'}:\n${examples.map((line) => `  ${line}`).join('\n')}`);
}
