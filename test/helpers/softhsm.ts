// Throw-away SoftHSM2 tokens for tests.
//
// SoftHSM2 reads SOFTHSM2_CONF once, at C_Initialize, and scans its token directory only then. So a
// test process uses one configuration (one temp token directory) for its whole life, and tokens
// should be created before the first backend opens the module: a token created while the module is
// initialised stays invisible until every backend using it has closed.

import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { accessSync, constants, existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

const MODULE_CANDIDATES = [
  '/usr/lib/softhsm/libsofthsm2.so',
  '/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so',
  '/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so',
  '/usr/lib64/pkcs11/libsofthsm2.so',
  '/usr/local/lib/softhsm/libsofthsm2.so',
  '/opt/homebrew/lib/softhsm/libsofthsm2.so',
];

/** Path of libsofthsm2.so (SOFTHSM2_MODULE overrides the search), or undefined. */
export function softHsmModulePath(): string | undefined {
  const override = process.env.SOFTHSM2_MODULE;
  if (override) return existsSync(override) ? override : undefined;
  return MODULE_CANDIDATES.find((p) => existsSync(p));
}

function onPath(command: string): boolean {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    if (!dir) continue;
    try {
      accessSync(join(dir, command), constants.X_OK);
      return true;
    } catch {
      // keep looking
    }
  }
  return false;
}

/** True when the SoftHSM2 module exists and softhsm2-util is on PATH. */
export function softHsmAvailable(): boolean {
  return softHsmModulePath() !== undefined && onPath('softhsm2-util');
}

export interface SoftHsmToken {
  /** PKCS#11 module path. */
  readonly module: string;
  /** Token label. */
  readonly token: string;
  /** User PIN. */
  readonly pin: string;
  /** Security officer PIN. */
  readonly soPin: string;
  /** The process-wide SoftHSM2 directory (configuration and tokens). */
  readonly dir: string;
  /** Environment for child processes that must see the same tokens. */
  readonly env: Record<string, string>;
  /** Deletes this token; the directory goes when the last token of this process is cleaned up. */
  cleanup(): Promise<void>;
}

interface SharedConf {
  readonly dir: string;
  readonly confPath: string;
  readonly previousConf: string | undefined;
  liveTokens: number;
}

let shared: Promise<SharedConf> | null = null;

async function sharedConf(): Promise<SharedConf> {
  shared ??= (async () => {
    const dir = await mkdtemp(join(tmpdir(), 'hallmark-softhsm-'));
    const tokenDir = join(dir, 'tokens');
    await mkdir(tokenDir);
    const confPath = join(dir, 'softhsm2.conf');
    await writeFile(confPath, [
      `directories.tokendir = ${tokenDir}`,
      'objectstore.backend = file',
      'log.level = ERROR',
      'slots.removable = false',
      '',
    ].join('\n'));
    const previousConf = process.env.SOFTHSM2_CONF;
    process.env.SOFTHSM2_CONF = confPath;
    return { dir, confPath, previousConf, liveTokens: 0 };
  })();
  try {
    return await shared;
  } catch (err) {
    shared = null;
    throw err;
  }
}

/** Runs softhsm2-util without echoing its arguments (they hold PINs) in errors. */
async function softhsmUtil(args: string[], env: Record<string, string>, what: string): Promise<void> {
  try {
    await run('softhsm2-util', args, { env: { ...process.env, ...env } });
  } catch (err) {
    const e = err as { stderr?: string; stdout?: string; code?: unknown };
    const output = (e.stderr || e.stdout || '').trim();
    throw new Error(`softhsm2-util ${what} failed (exit ${String(e.code)}): ${output}`);
  }
}

/**
 * Initialises a new token with random PINs in this process's SoftHSM2 directory and points
 * process.env.SOFTHSM2_CONF at that directory's configuration.
 */
export async function createSoftHsmToken(label?: string): Promise<SoftHsmToken> {
  const module = softHsmModulePath();
  if (!module || !onPath('softhsm2-util')) throw new Error('softhsm2 not installed: apt-get install softhsm2');
  const conf = await sharedConf();
  const env = { SOFTHSM2_CONF: conf.confPath };
  const token = label ?? `hallmark-test-${randomBytes(4).toString('hex')}`;
  const pin = randomBytes(8).toString('hex');
  const soPin = randomBytes(8).toString('hex');
  await softhsmUtil(['--init-token', '--free', '--label', token, '--pin', pin, '--so-pin', soPin], env, `--init-token --label ${token}`);
  conf.liveTokens++;

  let cleaned = false;
  return {
    module,
    token,
    pin,
    soPin,
    dir: conf.dir,
    env,
    async cleanup(): Promise<void> {
      if (cleaned) return;
      cleaned = true;
      conf.liveTokens--;
      if (conf.liveTokens > 0) {
        await softhsmUtil(['--delete-token', '--token', token], env, `--delete-token --token ${token}`);
        return;
      }
      // Last token: drop the whole directory and restore the caller's configuration.
      await rm(conf.dir, { recursive: true, force: true });
      if (conf.previousConf === undefined) delete process.env.SOFTHSM2_CONF;
      else process.env.SOFTHSM2_CONF = conf.previousConf;
      shared = null;
    },
  };
}
