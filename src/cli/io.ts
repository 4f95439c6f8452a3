// Shared CLI plumbing: argument parsing with --help, passphrases, output.

import { readFileSync } from 'node:fs';
import { userInfo } from 'node:os';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { HallmarkError } from '../errors.js';

export class UsageError extends Error {}

export interface Command {
  readonly name: string;
  readonly summary: string;
  readonly usage: string;
  readonly options: NonNullable<ParseArgsConfig['options']>;
  readonly allowPositionals?: boolean;
  run(args: ParsedArgs): Promise<number>;
}

export interface ParsedArgs {
  readonly values: Record<string, string | boolean | string[] | undefined>;
  readonly positionals: string[];
}

export const COMMON_OPTIONS = {
  home: { type: 'string' },
  help: { type: 'boolean', short: 'h' },
} as const;

export function parse(command: Command, argv: string[]): ParsedArgs | 'help' {
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: { ...COMMON_OPTIONS, ...command.options }, allowPositionals: command.allowPositionals ?? false, strict: true });
  } catch (err) {
    throw new UsageError(`${(err as Error).message}\n\n${command.usage}`);
  }
  if (parsed.values.help) return 'help';
  return { values: parsed.values as ParsedArgs['values'], positionals: parsed.positionals };
}

export const str = (args: ParsedArgs, name: string): string | undefined => args.values[name] as string | undefined;
export const list = (args: ParsedArgs, name: string): string[] => (args.values[name] as string[] | undefined) ?? [];
export const flag = (args: ParsedArgs, name: string): boolean => args.values[name] === true;

export function required(args: ParsedArgs, name: string, usage: string): string {
  const v = str(args, name);
  if (!v) throw new UsageError(`--${name} is required\n\n${usage}`);
  return v;
}

export function intOption(args: ParsedArgs, name: string): number | undefined {
  const v = str(args, name);
  if (v === undefined) return undefined;
  if (!/^\d{1,6}$/.test(v)) throw new UsageError(`--${name} must be a whole number`);
  return Number(v);
}

export function actor(): string {
  let user = 'unknown';
  try { user = userInfo().username; } catch { /* no passwd entry in some containers */ }
  return `cli:${user}`;
}

/** Reads a passphrase: --passphrase-file, then the environment variable, then a terminal prompt. */
export async function readPassphrase(args: ParsedArgs, options: { fileOption?: string; envVar?: string; prompt?: string; confirm?: boolean } = {}): Promise<string> {
  const file = str(args, options.fileOption ?? 'passphrase-file');
  if (file) {
    let text: string;
    try { text = readFileSync(file, 'utf8'); } catch (err) { throw new HallmarkError('PASSPHRASE_REQUIRED', `cannot read passphrase file ${file}: ${(err as NodeJS.ErrnoException).code}`); }
    return text.replace(/\r?\n$/, '');
  }
  const env = process.env[options.envVar ?? 'HALLMARK_PASSPHRASE'];
  if (env) return env;
  if (options.envVar && process.env.HALLMARK_PASSPHRASE) return process.env.HALLMARK_PASSPHRASE;
  if (!process.stdin.isTTY || !process.stderr.isTTY) {
    throw new HallmarkError('PASSPHRASE_REQUIRED', 'a passphrase is required: set HALLMARK_PASSPHRASE or give --passphrase-file (no terminal to ask on)');
  }
  const first = await promptHidden(options.prompt ?? 'Passphrase: ');
  if (options.confirm) {
    const second = await promptHidden('Repeat passphrase: ');
    if (first !== second) throw new HallmarkError('BAD_REQUEST', 'the passphrases do not match');
  }
  return first;
}

function promptHidden(prompt: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const stdin = process.stdin;
    process.stderr.write(prompt);
    stdin.setRawMode(true);
    stdin.resume();
    let value = '';
    const onData = (chunk: Buffer) => {
      for (const ch of chunk.toString('utf8')) {
        if (ch === '\r' || ch === '\n') { done(); resolve(value); return; }
        if (ch === '\u0003') { done(); reject(new HallmarkError('BAD_REQUEST', 'cancelled')); return; }
        if (ch === '\u007f' || ch === '\b') value = value.slice(0, -1); else value += ch;
      }
    };
    const done = () => { stdin.off('data', onData); stdin.setRawMode(false); stdin.pause(); process.stderr.write('\n'); };
    stdin.on('data', onData);
  });
}

export const out = (text: string): void => { process.stdout.write(text.endsWith('\n') ? text : text + '\n'); };
export const info = (text: string): void => { process.stderr.write(text.endsWith('\n') ? text : text + '\n'); };

/** Simple aligned table for terminal output. */
export function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => cells.map((c, i) => (c ?? '').padEnd(widths[i]!)).join('  ').trimEnd();
  return [line(headers), ...rows.map(line)].join('\n');
}
