/**
 * Vite build of the sessiond PWA. Served by sessiond at /app/ (api/web.py), so `base` is fixed.
 * JSX goes through Vite's own transform (no @vitejs/plugin-react needed: React 19's automatic runtime).
 * The `service-worker` plugin writes dist/sw.js from src/sw-template.js with the exact file list of this build
 * (hashed assets + public files) and a version derived from their contents: a new build = a new worker.
 */
import { createHash } from "node:crypto";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { join, relative } from "node:path";
import { defineConfig, type Plugin } from "vite";

const here = import.meta.dirname;

function publicFiles(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) out.push(...publicFiles(path));
    else out.push(relative(join(here, "public"), path).split("\\").join("/"));
  }
  return out;
}

function serviceWorker(): Plugin {
  return {
    name: "sessiond-service-worker",
    apply: "build",
    generateBundle(_options, bundle) {
      const hash = createHash("sha256");
      const files = Object.keys(bundle).filter((f) => !f.endsWith(".map") && f !== "index.html").sort();
      for (const f of files) {
        const item = bundle[f];
        hash.update(f).update(item.type === "chunk" ? item.code : item.source);
      }
      hash.update(readFileSync(join(here, "index.html")));
      const statics = publicFiles(join(here, "public")).sort();
      for (const f of statics) hash.update(f).update(readFileSync(join(here, "public", f)));
      const template = readFileSync(join(here, "src", "sw-template.js"), "utf8");
      const source = template
        .replace("__VERSION__", JSON.stringify(hash.digest("hex").slice(0, 16)))
        .replace("__PRECACHE__", JSON.stringify(["./", ...files, ...statics]));
      this.emitFile({ type: "asset", fileName: "sw.js", source });
    },
  };
}

export default defineConfig({
  base: "/app/",
  plugins: [serviceWorker()],
  // One React for the app and the linked SDK (sdk-ts has its own copy for its tests).
  resolve: { dedupe: ["react", "react-dom"] },
  build: { outDir: "dist", emptyOutDir: true, sourcemap: true, target: "es2022" },
  server: {
    // `npm run dev` against a local `make run`: REST on 8080 (the WebSocket URL comes from /app/config.json).
    proxy: { "/v1": "http://127.0.0.1:8080", "/app/config.json": "http://127.0.0.1:8080" },
  },
});
