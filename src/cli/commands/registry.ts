import { HallmarkError } from '../../errors.js';
import { parseDuration } from '../../authority/tokens.js';
import { Registry } from '../../registry/registry.js';
import { moveToLine } from '../../registry/line-move.js';
import { withAuthority, withStoreOnly } from '../context.js';
import { actor, flag, info, intOption, out, required, str, table, type Command } from '../io.js';

function parseValidity(text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  const ms = parseDuration(text);
  if (ms % 86_400_000) throw new HallmarkError('BAD_DURATION', 'a certificate validity is given in whole days (90d, 2y)');
  return ms / 86_400_000;
}

export const productCreateCommand: Command = {
  name: 'product create',
  summary: 'define a product (what is built) and its certificate profile',
  usage: `Usage: hallmark product create NAME [--profile device|tls-server] [--validity 1y] [--allow-server-keygen] [--allow-rekey] [--renew-after 66%] [--home DIR]

--allow-server-keygen  EST serverkeygen may generate this product's device keys (devices that cannot make keys)
--allow-rekey          an operational key may differ from the device's registered hardware key
                       (a new key at re-enrolment, or a separate operational key at first enrolment)
--renew-after P%       re-enrolment with the current certificate is refused before P % of its lifetime
                       has passed (EST answers 403 with Retry-After); default 0: any time`,
  allowPositionals: true,
  options: { profile: { type: 'string' }, validity: { type: 'string' }, 'allow-server-keygen': { type: 'boolean' }, 'allow-rekey': { type: 'boolean' }, 'renew-after': { type: 'string' } },
  async run(args) {
    const name = args.positionals[0];
    if (!name || args.positionals.length > 1) throw new HallmarkError('BAD_REQUEST', `give one product name\n${this.usage}`);
    const validityDays = parseValidity(str(args, 'validity'));
    return withStoreOnly(args, async (ctx) => {
      await new Registry(ctx.store).createProduct({ name, profile: str(args, 'profile'), validityDays, allowServerKeygen: flag(args, 'allow-server-keygen'), allowRekey: flag(args, 'allow-rekey'), renewAfterPercent: parsePercent(str(args, 'renew-after')), actor: actor() });
      out(`Created product ${name}`);
      return 0;
    });
  },
};

export const productListCommand: Command = {
  name: 'product list',
  summary: 'list products',
  usage: 'Usage: hallmark product list [--json] [--home DIR]',
  options: { json: { type: 'boolean' } },
  async run(args) {
    return withStoreOnly(args, async (ctx) => {
      const products = await new Registry(ctx.store).listProducts();
      out(flag(args, 'json') ? JSON.stringify(products, null, 2) : table(['NAME', 'PROFILE', 'VALIDITY (DAYS)', 'CREATED'], products.map((p) => [p.name, p.profile, String(p.validityDays), p.createdAt])));
      return 0;
    });
  },
};

export const lineCreateCommand: Command = {
  name: 'line create',
  summary: 'define a production line with its own issuing CA',
  usage: `Usage: hallmark line create NAME [--ca CA_NAME | --parent-ca CA_NAME] [--key-algorithm ALG] [--home DIR]

Every line should have its own issuing CA, so that one line can be revoked as a whole:
- default: a new intermediate CA "line-NAME" is requested (key made in the key backend) and the
  offline ceremony finishes it: hallmark root sign ... then hallmark ca install. Devices of the line
  get certificates once that CA is active.
- --parent-ca CA: the new CA "line-NAME" is signed at once by that intermediate, when its path length
  allows (a parent signed with root sign --path-len 1).
- --ca CA: the line issues under an existing intermediate CA (shared with other lines).`,
  allowPositionals: true,
  options: { ca: { type: 'string' }, 'parent-ca': { type: 'string' }, 'key-algorithm': { type: 'string' }, 'passphrase-file': { type: 'string' } },
  async run(args) {
    const name = args.positionals[0];
    if (!name || args.positionals.length > 1) throw new HallmarkError('BAD_REQUEST', `give one line name\n${this.usage}`);
    const existing = str(args, 'ca');
    if (existing && str(args, 'parent-ca')) throw new HallmarkError('BAD_REQUEST', '--ca and --parent-ca exclude each other');
    if (existing) {
      return withStoreOnly(args, async (ctx) => {
        await new Registry(ctx.store).createLine({ name, ca: existing, actor: actor() });
        out(`Created line ${name}, issuing under CA ${existing}`);
        return 0;
      });
    }
    const parent = str(args, 'parent-ca');
    if (parent) {
      return withAuthority(args, async (authority) => {
        const ca = await authority.createSubordinateCa({ name: `line-${name}`, parent, algorithm: str(args, 'key-algorithm'), actor: actor() });
        await authority.registry.createLine({ name, ca: ca.name, actor: actor() });
        out(`Created line ${name} with its CA ${ca.name} (signed by ${parent}, valid until ${ca.notAfter})`);
        return 0;
      });
    }
    return withAuthority(args, async (authority) => {
      const caName = `line-${name}`;
      const { path } = await authority.requestCa({ name: caName, algorithm: str(args, 'key-algorithm'), actor: actor() });
      await authority.registry.createLine({ name, ca: caName, actor: actor() });
      out(`Created line ${name}; its CA ${caName} waits for the root ceremony.`);
      info(`Next, offline: hallmark root sign --root-dir DIR --csr ${path} --out ${caName}.pem\nthen: hallmark ca install --cert ${caName}.pem`);
      return 0;
    });
  },
};

export const lineMoveCommand: Command = {
  name: 'line move',
  summary: "move a line's batches and devices to another line (after a line CA compromise)",
  usage: `Usage: hallmark line move --from NAME --to NAME [--batch ID] [--home DIR]

The devices keep their hardware identity and UDID; their next enrolment is issued by the new line's CA.
See docs/revocation.md, "Line compromise drill".`,
  options: { from: { type: 'string' }, to: { type: 'string' }, batch: { type: 'string' } },
  async run(args) {
    const from = required(args, 'from', this.usage);
    const to = required(args, 'to', this.usage);
    return withStoreOnly(args, async (ctx) => {
      const moved = await moveToLine(ctx.store, { from, to, batch: str(args, 'batch'), actor: actor() });
      out(`Moved ${moved.batches.length} batch(es) and ${moved.devices} device(s) from line ${from} to line ${to}`);
      return 0;
    });
  },
};

export const lineListCommand: Command = {
  name: 'line list',
  summary: 'list production lines, their CAs and refused (over-quota) issuances',
  usage: 'Usage: hallmark line list [--json] [--home DIR]',
  options: { json: { type: 'boolean' } },
  async run(args) {
    return withStoreOnly(args, async (ctx) => {
      const lines = await new Registry(ctx.store).listLines();
      out(flag(args, 'json') ? JSON.stringify(lines, null, 2) : table(['NAME', 'CA', 'CA STATUS', 'REFUSED ISSUANCES', 'CREATED'], lines.map((l) => [l.name, l.ca, l.caStatus, String(l.refusedIssuances), l.createdAt])));
      return 0;
    });
  },
};

export const batchCreateCommand: Command = {
  name: 'batch create',
  summary: 'open a counted batch of devices on a line (prints the batch id)',
  usage: `Usage: hallmark batch create --product NAME --line NAME --quota N [--expires DATE] [--allow-unregistered] [--require-approval] [--home DIR]

The quota caps how many devices of the batch may ever receive an operational identity.
--allow-unregistered  a claim may enrol keys not registered yet (they are registered on first use)
--require-approval    each device's first enrolment waits for an operator: EST answers 202 with
                      Retry-After until hallmark enrolment approve ID (or reject)`,
  options: { product: { type: 'string' }, line: { type: 'string' }, quota: { type: 'string' }, expires: { type: 'string' }, 'allow-unregistered': { type: 'boolean' }, 'require-approval': { type: 'boolean' } },
  async run(args) {
    const product = required(args, 'product', this.usage);
    const line = required(args, 'line', this.usage);
    const quota = intOption(args, 'quota');
    if (quota === undefined) throw new HallmarkError('BAD_REQUEST', `--quota is required\n${this.usage}`);
    const expiresText = str(args, 'expires');
    const expiresAt = expiresText ? new Date(expiresText) : undefined;
    if (expiresAt && Number.isNaN(expiresAt.getTime())) throw new HallmarkError('BAD_REQUEST', `--expires is not a date: ${expiresText}`);
    return withStoreOnly(args, async (ctx) => {
      const id = await new Registry(ctx.store).createBatch({ product, line, quota, expiresAt, allowUnregistered: flag(args, 'allow-unregistered'), requireApproval: flag(args, 'require-approval'), actor: actor() });
      out(id);
      return 0;
    });
  },
};

export const batchListCommand: Command = {
  name: 'batch list',
  summary: 'list batches with quota, issued, refused and registered counts',
  usage: 'Usage: hallmark batch list [--json] [--home DIR]',
  options: { json: { type: 'boolean' } },
  async run(args) {
    return withStoreOnly(args, async (ctx) => {
      const batches = await new Registry(ctx.store).listBatches();
      out(flag(args, 'json') ? JSON.stringify(batches, null, 2) : table(['ID', 'PRODUCT', 'LINE', 'QUOTA', 'ISSUED', 'REFUSED', 'REGISTERED', 'EXPIRES'],
        batches.map((b) => [b.id, b.product, b.line, String(b.quota), String(b.issued), String(b.refused), String(b.registered), b.expiresAt ?? '-'])));
      return 0;
    });
  },
};

function parsePercent(text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  const m = /^(\d{1,2})%?$/.exec(text.trim());
  if (!m) throw new HallmarkError('BAD_REQUEST', `--renew-after must be a percentage 0-99, e.g. 66%: ${JSON.stringify(text)}`);
  return Number(m[1]);
}
