import { readFile } from 'node:fs/promises';
import { HallmarkError } from '../../errors.js';
import { Registry, type DeviceAction } from '../../registry/registry.js';
import { registryFor } from '../../registry/birth-certificates.js';
import type { DeviceState } from '../../store/schema.js';
import { SIZE_LIMITS, decodeOne } from '../../pki/pem.js';
import { publicKeyFromFile } from '../../pki/public-key.js';
import { withStoreOnly } from '../context.js';
import { actor, flag, intOption, out, required, str, table, type Command } from '../io.js';

async function readInput(file: string): Promise<Buffer> {
  try { return await readFile(file); } catch { throw new HallmarkError('BAD_REQUEST', `cannot read ${file}`); }
}

export const deviceRegisterCommand: Command = {
  name: 'device register',
  summary: 'register one device (its hardware public key) in a batch',
  usage: `Usage: hallmark device register --batch ID --public-key FILE [--udid HEX] [--serial S] [--birth-cert FILE] [--tenant NAME] [--home DIR]

FILE is a PEM or DER public key (SubjectPublicKeyInfo) or a certificate. The UDID defaults to the hex
SHA-256 of the key's SPKI DER. A UDID or key that another device already holds is refused as a clone.`,
  options: { batch: { type: 'string' }, 'public-key': { type: 'string' }, udid: { type: 'string' }, serial: { type: 'string' }, 'birth-cert': { type: 'string' }, tenant: { type: 'string' }, json: { type: 'boolean' } },
  async run(args) {
    const batch = required(args, 'batch', this.usage);
    const spki = publicKeyFromFile(await readInput(required(args, 'public-key', this.usage)));
    const birthFile = str(args, 'birth-cert');
    const birthCertificate = birthFile ? decodeOne(await readInput(birthFile), ['CERTIFICATE'], SIZE_LIMITS.certificate) : undefined;
    return withStoreOnly(args, async (ctx) => {
      const registry = registryFor(ctx.store);
      const device = await registry.registerDevice(batch, { publicKeySpki: spki, udid: str(args, 'udid'), serialNumber: str(args, 'serial'), birthCertificate, tenant: str(args, 'tenant') }, actor());
      out(flag(args, 'json') ? JSON.stringify(device, null, 2) : `Registered ${device.udid} in batch ${device.batch} (${device.state})`);
      return 0;
    });
  },
};

export const deviceShowCommand: Command = {
  name: 'device show',
  summary: 'one device: state, product, line, batch, tenant, key and certificates',
  usage: 'Usage: hallmark device show UDID [--json] [--home DIR]',
  allowPositionals: true,
  options: { json: { type: 'boolean' } },
  async run(args) {
    const udid = args.positionals[0];
    if (!udid) throw new HallmarkError('BAD_REQUEST', `give a UDID\n${this.usage}`);
    return withStoreOnly(args, async (ctx) => {
      const device = await new Registry(ctx.store).device(udid);
      const certificates = await ctx.store.db.selectFrom('certificates').select(['serial', 'status', 'not_after', 'fingerprint_sha256']).where('device_udid', '=', device.udid).orderBy('created_at').execute();
      const full = { ...device, certificates: certificates.map((c) => ({ serial: c.serial, status: c.status, notAfter: c.not_after, fingerprintSha256: c.fingerprint_sha256 })) };
      if (flag(args, 'json')) { out(JSON.stringify(full, null, 2)); return 0; }
      out(Object.entries(device).map(([k, v]) => `${k.padEnd(20)} ${v ?? '-'}`).join('\n'));
      out(`certificates         ${full.certificates.length === 0 ? '-' : full.certificates.map((c) => `${c.serial} ${c.status} until ${c.notAfter}`).join('\n                     ')}`);
      return 0;
    });
  },
};

export const deviceListCommand: Command = {
  name: 'device list',
  summary: 'list devices, filtered by batch, state or tenant, in pages',
  usage: 'Usage: hallmark device list [--batch ID] [--state S] [--tenant T] [--after UDID] [--limit N] [--json] [--home DIR]',
  options: { batch: { type: 'string' }, state: { type: 'string' }, tenant: { type: 'string' }, after: { type: 'string' }, limit: { type: 'string' }, json: { type: 'boolean' } },
  async run(args) {
    const state = str(args, 'state') as DeviceState | undefined;
    if (state && !['registered', 'provisioned', 'active', 'suspended', 'revoked', 'decommissioned'].includes(state)) throw new HallmarkError('BAD_REQUEST', `unknown state ${state}`);
    return withStoreOnly(args, async (ctx) => {
      const page = await new Registry(ctx.store).listDevices({ batch: str(args, 'batch'), state, tenant: str(args, 'tenant'), after: str(args, 'after'), limit: intOption(args, 'limit') ?? 100 });
      if (flag(args, 'json')) { out(JSON.stringify(page, null, 2)); return 0; }
      out(table(['UDID', 'SERIAL', 'STATE', 'PRODUCT', 'LINE', 'BATCH', 'TENANT'], page.items.map((d) => [d.udid, d.serialNumber ?? '-', d.state, d.product, d.line, d.batch, d.tenant])));
      if (page.next) out(`(more: --after ${page.next})`);
      return 0;
    });
  },
};

export const deviceTransferCommand: Command = {
  name: 'device transfer',
  summary: 'transfer a device to another tenant (owner)',
  usage: 'Usage: hallmark device transfer UDID --to TENANT [--home DIR]',
  allowPositionals: true,
  options: { to: { type: 'string' } },
  async run(args) {
    const udid = args.positionals[0];
    if (!udid) throw new HallmarkError('BAD_REQUEST', `give a UDID\n${this.usage}`);
    const to = required(args, 'to', this.usage);
    return withStoreOnly(args, async (ctx) => {
      const d = await new Registry(ctx.store).transfer(udid, to, actor());
      out(`Device ${d.udid} now belongs to ${d.tenant}`);
      return 0;
    });
  },
};

function stateCommand(action: DeviceAction, summary: string): Command {
  return {
    name: `device ${action}`,
    summary,
    usage: `Usage: hallmark device ${action} UDID [--home DIR]`,
    allowPositionals: true,
    options: {},
    async run(args) {
      const udid = args.positionals[0];
      if (!udid) throw new HallmarkError('BAD_REQUEST', `give a UDID\n${this.usage}`);
      return withStoreOnly(args, async (ctx) => {
        const d = await new Registry(ctx.store).changeState(udid, action, actor());
        out(`Device ${d.udid} is ${d.state}`);
        return 0;
      });
    },
  };
}

export const deviceSuspendCommand = stateCommand('suspend', 'suspend a device (no certificates until resumed)');
export const deviceResumeCommand = stateCommand('resume', 'resume a suspended device');
export const deviceDecommissionCommand = stateCommand('decommission', 'end of life: revoke its certificates; it may never enrol again unless registered anew');
