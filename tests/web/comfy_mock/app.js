// Minimal stand-in for ComfyUI's scripts/app.js, enough for web/k5_train_widget.js.
export const app = {
  extensions: [],
  queued: [],
  canvas: {},
  registerExtension(ext) {
    this.extensions.push(ext);
  },
  async queuePrompt(number, batchCount = 1) {
    this.queued.push({ number, batchCount });
    return true;
  },
};
